"""The control plane's seams, in process: the serving process's run states, the plugin's key table, the
command context, and the HMP words over the command runner they are handed."""

from __future__ import annotations

import errno
import itertools
import os
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.commands import run
from tests.support.images import assert_clean
from vdisk.errors import DeviceNotFound, GenericError, ServingError, StateError, VdiskError
from vdisk.formats.qcow2.cache import CacheOptions
from vdisk.qmp import commands, hmp
from vdisk.qmp.connection import Command
from vdisk.qmp.context import CommandContext
from vdisk.serving.config import KEYS, PluginConfig, PluginConfigParser, config_help, plugin_arguments
from vdisk.serving.launcher import ServeOptions
from vdisk.serving.process import RUN_STATE_TABLE, RunState, ServingProcess, Step, next_run_state

# --- the run-state table -----------------------------------------------------------------------------------

ALLOWED = {
    (RunState.CONFIGURING, Step.CONFIG): RunState.CONFIGURING,
    (RunState.CONFIGURING, Step.CONFIG_COMPLETE): RunState.CONFIGURED,
    (RunState.CONFIGURED, Step.OPEN): RunState.READY,
    (RunState.READY, Step.START): RunState.RUNNING,
    (RunState.RUNNING, Step.CONNECT): RunState.RUNNING,
    **{(state, Step.SHUTDOWN): RunState.STOPPED for state in RunState if state is not RunState.STOPPED},
}


@pytest.mark.parametrize(("state", "step"), list(itertools.product(RunState, Step)))
def test_every_run_state_pair_is_allowed_or_refused_with_a_state_error(state, step):
    if (state, step) in ALLOWED:
        assert next_run_state(state, step) is ALLOWED[(state, step)]
    else:
        with pytest.raises(StateError) as info:
            next_run_state(state, step)
        assert (info.value.state, info.value.action) == (state.value, step.value)
    assert RUN_STATE_TABLE == ALLOWED


def make_image(directory) -> str:
    path = directory / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", path, "1M")
    return str(path)


def configured(image: str, **keys: str) -> ServingProcess:
    process = ServingProcess()
    for key, value in {"image": image, **keys}.items():
        process.config(key, value)
    process.config_complete()
    return process


def test_a_step_out_of_order_is_refused_and_changes_nothing(tmp_path):
    process = ServingProcess()
    for step in (process.open, lambda: process.start(lambda: None), process.device_for_connection):
        with pytest.raises(StateError):
            step()
        assert process.state is RunState.CONFIGURING
    with pytest.raises(StateError):
        process.plugin_config  # noqa: B018 - the property refuses before config_complete
    process.config("image", make_image(tmp_path))
    process.config_complete()
    with pytest.raises(StateError):
        process.config("device", "drive1")
    assert process.plugin_config.device == "drive0"


def test_a_bad_key_leaves_the_process_configuring(tmp_path):
    process = ServingProcess()
    with pytest.raises(GenericError, match="unknown parameter 'colour'; known: image, format"):
        process.config("colour", "blue")
    with pytest.raises(GenericError, match=r"image=PATH is required"):
        process.config_complete()
    assert process.state is RunState.CONFIGURING
    process.config("image", make_image(tmp_path))
    process.config_complete()
    assert process.state is RunState.CONFIGURED


def test_a_failed_open_leaves_configured_with_our_own_error(tmp_path):
    process = configured(str(tmp_path / "missing.qcow2"))
    with pytest.raises(VdiskError) as info:
        process.open()
    assert not isinstance(info.value, ServingError)  # ours pass through as they are
    assert process.state is RunState.CONFIGURED and process.context.devices == {}
    process.shutdown()
    assert process.state is RunState.STOPPED


def test_a_failed_start_rolls_back_to_ready_and_chains_the_cause(tmp_path):
    image = make_image(tmp_path)
    process = configured(image, qmp=str(tmp_path / "no-such-dir" / "qmp.sock"))
    process.open()
    with pytest.raises(ServingError) as info:
        process.start(lambda: None)
    assert info.value.step == "start" and isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.ENOENT
    assert process.state is RunState.READY and process.monitor is None
    assert process.context.jobs.broadcast is None and process.context.stop_request is None
    process.shutdown()
    assert process.context.devices == {}
    assert_clean(image)


def test_the_whole_life_with_a_monitor_and_a_quit(tmp_path):
    image = make_image(tmp_path)
    qmp_path = tmp_path / "qmp.sock"
    process = configured(image, qmp=str(qmp_path), device="vda")
    process.open()
    stops = []
    process.start(lambda: stops.append("stop"))
    assert process.state is RunState.RUNNING and qmp_path.is_socket()
    assert process.device_for_connection() is process.context.devices["vda"]
    reply = commands.dispatch(process.context, Command("quit", {}, 7))
    assert reply == b'{"return": {}, "id": 7}\r\n' and stops == ["stop"]
    process.shutdown()
    assert process.state is RunState.STOPPED and not qmp_path.exists()
    with pytest.raises(StateError):
        process.shutdown()
    with socket.socket(socket.AF_UNIX) as client, pytest.raises(OSError):
        client.connect(str(qmp_path))
    assert_clean(image)


# --- the command context ----------------------------------------------------------------------------------


def test_context_looks_devices_up_and_refuses_quit_without_a_stop_request():
    context = CommandContext()
    with pytest.raises(DeviceNotFound, match="Device 'vda' not found"):
        context.device("vda")
    reply = commands.dispatch(context, Command("quit", {}))
    assert reply == (b'{"error": {"class": "GenericError", "desc": "this server cannot be stopped from the '
                     b'monitor"}}\r\n')


# --- the plugin's key table -------------------------------------------------------------------------------

paths = st.text(st.sampled_from("ab/._-"), min_size=1, max_size=12).map(lambda p: os.path.abspath(p))
sizes = st.one_of(st.none(), st.integers(0, 1 << 40))
caches = st.builds(CacheOptions, cache_size=st.none(), l2_cache_size=sizes, refcount_cache_size=sizes,
                   cache_clean_interval=st.integers(0, 10**6))
plugin_configs = st.builds(
    PluginConfig, image=paths, format=st.one_of(st.none(), st.sampled_from(["qcow2", "raw"])),
    device=st.text("abcdrive0", min_size=1, max_size=8), read_only=st.booleans(), copy_on_read=st.booleans(),
    qmp=st.one_of(st.none(), paths), description=st.one_of(st.none(), st.text(max_size=20)),
    allow_backing_dirs=st.lists(paths, max_size=3).map(tuple), serialize=st.booleans(), cache=caches,
    stop_fd=st.one_of(st.none(), st.integers(0, 1023)),
)


@settings(max_examples=200, deadline=None)
@given(plugin_configs)
def test_the_plugin_reads_back_exactly_what_the_launcher_wrote(plugin_config):
    parser = PluginConfigParser()
    for word in plugin_arguments(plugin_config):
        key, _, value = word.partition("=")
        parser.add(key, value)
    assert parser.complete() == plugin_config


def test_the_launcher_writes_only_what_differs_from_the_defaults():
    assert plugin_arguments(ServeOptions(image="/i.qcow2").plugin_config()) == ["image=/i.qcow2"]
    words = plugin_arguments(ServeOptions(image="/i.qcow2", read_only=True, allow_backing_dirs=("/a", "/b"),
                                          cache=CacheOptions(l2_cache_size=1 << 20)).plugin_config(stop_fd=5))
    assert words == ["image=/i.qcow2", "readonly=true", "allow-backing-dir=/a", "allow-backing-dir=/b",
                     "l2-cache-size=1048576", "stop-fd=5"]


def test_help_has_one_line_per_key_and_marks_the_required_one():
    lines = config_help().splitlines()
    assert [line.split("=", 1)[0] for line in lines] == [key.name for key in KEYS]
    assert lines[0] == "image=PATH          (required) the active image of the chain to serve"


@pytest.mark.parametrize(("key", "text", "message"), [
    ("cache-clean-interval", "soon", "cache-clean-interval must be a whole number of seconds, not 'soon'"),
    ("stop-fd", "x", "stop-fd must be a file descriptor number, not 'x'"),
    ("cache-size", "lots", "invalid size 'lots'"),
])
def test_a_value_that_does_not_read_is_refused_with_the_key_or_value_named(key, text, message):
    with pytest.raises(VdiskError, match=message):
        PluginConfigParser().add(key, text)


def test_cache_settings_are_checked_as_a_whole_on_completion():
    parser = PluginConfigParser()
    for key, value in (("image", "/i"), ("cache-size", "1M"), ("l2-cache-size", "2M")):
        parser.add(key, value)
    with pytest.raises(VdiskError, match="l2-cache-size may not exceed cache-size"):
        parser.complete()


def test_booleans_read_as_nbdkit_users_write_them():
    for text, value in (("on", True), ("1", True), ("YES", True), ("off", False), ("nonsense", False)):
        parser = PluginConfigParser()
        parser.add("image", "/i")
        parser.add("readonly", text)
        assert parser.complete().read_only is value


# --- HMP over a command runner ----------------------------------------------------------------------------


def test_hmp_words_run_commands_by_their_qmp_names():
    calls = []

    def run_command(name, **arguments):
        calls.append((name, arguments))
        return {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "x"} if name == "query-version" else []

    assert hmp.run_hmp(run_command, "block_stream vda 1M base.qcow2") == ""
    assert hmp.run_hmp(run_command, "block_job_cancel -f vda") == ""
    assert hmp.run_hmp(run_command, "info version") == "7.2.0 (x)\r\n"
    assert hmp.run_hmp(run_command, "info block-jobs") == "No active jobs\r\n"
    assert calls == [
        ("block-stream", {"device": "vda", "job_id": "vda", "base": "base.qcow2", "speed": 1 << 20}),
        ("block-job-cancel", {"device": "vda", "force": True}),
        ("query-version", {}),
        ("query-block-jobs", {}),
    ]
