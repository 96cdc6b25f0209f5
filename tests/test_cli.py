"""The ``vdisk`` commands, run as a user runs them, against what ``qemu-img`` says about the same files.

``vdisk create`` makes what ``qemu-img info`` expects from the same options; ``vdisk check`` exits 0/2/3
exactly when ``qemu-img check`` does and repairs (``-r leaks``, ``-r all``) as it does; ``vdisk info`` and
``vdisk map`` print what ``qemu-img`` prints; errors are one line on stderr and exit 1, never a traceback.
"""

from __future__ import annotations

import json
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.commands import run, vdisk, vdisk_main
from tests.support.images import assert_clean, qemu_img_check

pytestmark = pytest.mark.timeout(120)

KiB = 1024
MiB = 1024 * KiB
INFO_KEYS = ("virtual-size", "format", "cluster-size", "backing-filename", "backing-filename-format",
             "full-backing-filename", "format-specific", "dirty-flag")


@pytest.fixture
def vd(capsys):
    """``vdisk`` in this process (fast); the few tests that must see a real process use ``vdisk``."""

    def call(*args: str, check: bool = True):
        proc = vdisk_main(capsys, *args)
        if check and proc.returncode != 0:
            raise AssertionError(f"vdisk {args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    return call


def qemu_info(path: Path) -> dict:
    return json.loads(run("qemu-img", "info", "--output=json", path).stdout)


def pick(info: dict) -> dict:
    return {k: info.get(k) for k in INFO_KEYS}


def assert_one_line_error(proc, *words: str) -> None:
    assert proc.returncode == 1, proc
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


# --- create --------------------------------------------------------------------------------------------

CREATE_CASES = {
    "default": ([], "3M"),
    "cluster-512": (["-o", "cluster_size=512"], "1M"),
    "cluster-4k-refcount-1": (["-o", "cluster_size=4k,refcount_bits=1"], "2M"),
    "cluster-2M": (["-o", "cluster_size=2M"], "5M"),
    "extended-l2": (["-o", "extended_l2=on,cluster_size=128k"], "64M"),
    "refcount-64": (["-o", "refcount_bits=64"], "1G"),
    "compat-0.10": (["-o", "compat=0.10"], "10M"),
    "zstd": (["-o", "compression_type=zstd"], "1M"),
    "odd-size": ([], "1537k"),
    "backing-qcow2": (["-b", "base.qcow2", "-F", "qcow2"], None),
    "backing-qcow2-bigger": (["-b", "base.qcow2", "-F", "qcow2"], "16M"),
    "backing-raw": (["-b", "base.raw", "-F", "raw"], None),
    "backing-v2-512": (["-b", "base.qcow2", "-F", "qcow2", "-o", "compat=0.10,cluster_size=512"], None),
    "backing-extended-l2": (["-b", "base.qcow2", "-F", "qcow2", "-o", "extended_l2=on"], None),
}


@pytest.fixture
def bases(tmp_path: Path) -> Path:
    run("qemu-img", "create", "-q", "-f", "qcow2", tmp_path / "base.qcow2", "4M")
    run("qemu-io", "-c", "write -P 0x5b 0 1M", tmp_path / "base.qcow2")
    run("qemu-img", "create", "-q", "-f", "raw", tmp_path / "base.raw", "3M")
    return tmp_path


@pytest.mark.parametrize("case", CREATE_CASES, ids=list(CREATE_CASES))
def test_vdisk_create_makes_what_qemu_img_create_makes(case: str, bases: Path, vd):
    """Same options to both tools: qemu-img info reports the same image, and it is clean and reads the same."""
    options, size = CREATE_CASES[case]
    ours, theirs = bases / "ours.qcow2", bases / "theirs.qcow2"
    size_arg = [size] if size else []
    proc = vd("create", "-f", "qcow2", *options, str(ours), *size_arg)
    assert proc.stdout.startswith(f"Formatting '{ours}'")
    run("qemu-img", "create", "-q", "-f", "qcow2", *options, theirs, *size_arg)

    info_ours, info_theirs = qemu_info(ours), qemu_info(theirs)
    info_theirs["full-backing-filename"] = info_theirs.get("full-backing-filename")
    assert pick(info_ours) == pick(info_theirs)
    assert_clean(ours)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", ours, theirs)
    # vdisk info describes our image as qemu-img info does.
    ours_by_vdisk = json.loads(vd("info", "--output=json", str(ours)).stdout)
    assert pick(ours_by_vdisk) == pick(info_ours)


def test_vdisk_create_raw(tmp_path: Path, vd):
    vd("create", "-f", "raw", str(tmp_path / "d.raw"), "3M")
    info = qemu_info(tmp_path / "d.raw")
    assert (info["format"], info["virtual-size"]) == ("raw", 3 * MiB)


def test_vdisk_create_without_backing_format_probes_it(bases: Path, vd):
    vd("create", "-b", "base.raw", str(bases / "top.qcow2"))
    info = qemu_info(bases / "top.qcow2")
    assert (info["backing-filename"], info.get("backing-filename-format"), info["virtual-size"]) == (
        "base.raw", "raw", 3 * MiB)


@pytest.mark.parametrize(
    "args, words",
    [
        (["-o", "cluster_size=1000"], ("cluster size", "1000")),
        (["-o", "cluster_size=4M"], ("cluster size",)),
        (["-o", "refcount_bits=3"], ("refcount bits", "3")),
        (["-o", "compat=0.10,extended_l2=on"], ("compat=0.10",)),
        (["-o", "extended_l2=on,cluster_size=4k"], ("extended L2", "16 KiB")),
        (["-o", "colour=blue"], ("unknown option", "colour")),
        (["-o", "compression_type=lz4"], ("compression_type", "lz4")),
        (["-b", "missing.qcow2", "-F", "qcow2"], ("missing.qcow2",)),
    ],
    ids=["cluster-1000", "cluster-4M", "refcount-3", "v2-extended-l2", "extended-l2-4k", "unknown-option",
         "lz4", "missing-backing"],
)
def test_vdisk_create_refuses_bad_options_in_one_line(args: list[str], words: tuple[str, ...], tmp_path: Path, vd):
    proc = vd("create", *args, str(tmp_path / "x.qcow2"), "1M", check=False)
    assert_one_line_error(proc, *words)


def test_vdisk_create_without_size_or_backing_is_refused(tmp_path: Path):
    assert_one_line_error(vdisk("create", str(tmp_path / "x.qcow2"), check=False), "size")


@pytest.mark.parametrize("size, expected", [("512", 512), ("64k", 64 * KiB), ("1M", MiB), ("1.5M", 1536 * KiB),
                                            ("2G", 2 << 30), ("1T", 1 << 40), ("3MiB", 3 * MiB)])
def test_vdisk_create_sizes_are_read_like_qemu_img(size: str, expected: int, tmp_path: Path, vd):
    vd("create", str(tmp_path / "x.qcow2"), size)
    assert qemu_info(tmp_path / "x.qcow2")["virtual-size"] == expected


# --- check ---------------------------------------------------------------------------------------------


def refcount_entry(path: Path, cluster_index: int) -> int:
    data = path.read_bytes()
    reftable = struct.unpack_from(">Q", data, 48)[0]
    block = struct.unpack_from(">Q", data, reftable + 8 * (cluster_index // 32768))[0]
    return block + 2 * (cluster_index % 32768)


def set_refcount(path: Path, cluster_index: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(refcount_entry(path, cluster_index))
        f.write(struct.pack(">H", value))


def first_data_cluster(path: Path) -> int:
    data = path.read_bytes()
    l1 = struct.unpack_from(">Q", data, 40)[0]
    l2 = struct.unpack_from(">Q", data, l1)[0] & 0x00FFFFFFFFFFFE00
    return (struct.unpack_from(">Q", data, l2)[0] & 0x00FFFFFFFFFFFE00) >> 16


@pytest.fixture
def written(tmp_path: Path) -> Path:
    """A qemu-made image with data, a zero cluster, and a cluster qemu freed (left inside the file)."""
    image = tmp_path / "img.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image, "4M")
    run("qemu-io", "-c", "write -P 1 0 512k", "-c", "discard 128k 64k", "-c", "write -z 1M 64k", image)
    return image


def damage_leak(image: Path) -> None:
    """A cluster beyond everything, with a refcount and no reference: a leak only."""
    end = -(-image.stat().st_size // 65536)
    with open(image, "r+b") as f:
        f.truncate((end + 1) * 65536)
    set_refcount(image, end, 1)


def damage_corruption(image: Path) -> None:
    """A referenced data cluster's refcount drops from 1 to 0: a corruption (qemu-img -r leaks wants a rebuild)."""
    set_refcount(image, first_data_cluster(image), 0)


def damage_leak_and_corruption(image: Path) -> None:
    damage_leak(image)
    # Refcount 2 under a COPIED entry: a leak, and a COPIED-flag corruption.
    set_refcount(image, first_data_cluster(image) + 1, 2)


DAMAGES = {"clean": lambda image: None, "leak": damage_leak, "corruption": damage_corruption,
           "leak-and-copied-flag": damage_leak_and_corruption}


@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
@pytest.mark.parametrize("output", ["human", "json"])
def test_vdisk_check_exit_code_is_qemu_img_checks(damage: str, output: str, written: Path, vd):
    DAMAGES[damage](written)
    theirs = run("qemu-img", "check", f"--output={output}", written, check=False)
    ours = vd("check", f"--output={output}", str(written), check=False)
    assert theirs.returncode in (0, 2, 3)
    assert ours.returncode == theirs.returncode, (ours, theirs)
    assert "Traceback" not in ours.stderr
    if output == "json":
        a, b = json.loads(ours.stdout), json.loads(theirs.stdout)
        for key in ("corruptions", "leaks", "check-errors", "allocated-clusters", "total-clusters",
                    "image-end-offset"):
            assert a.get(key) == b.get(key), key
    else:
        # The summary lines people read are qemu-img's.
        for line in theirs.stdout.splitlines():
            if line.startswith(("No errors", "Image end offset")) or "leaked clusters were found" in line or (
                "errors were found" in line
            ):
                assert line in ours.stdout, (line, ours.stdout)


def test_vdisk_check_exit_codes_are_0_2_3(written: Path, tmp_path: Path):
    """The same contract stated directly, one image per code."""
    assert vdisk("check", str(written)).returncode == 0
    leak = tmp_path / "leak.qcow2"
    leak.write_bytes(written.read_bytes())
    damage_leak(leak)
    assert vdisk("check", str(leak), check=False).returncode == 3
    corrupt = tmp_path / "corrupt.qcow2"
    corrupt.write_bytes(written.read_bytes())
    damage_corruption(corrupt)
    assert vdisk("check", str(corrupt), check=False).returncode == 2


@pytest.mark.parametrize("damage", ["leak", "leak-and-copied-flag", "corruption"])
@pytest.mark.parametrize("mode", ["leaks", "all"])
def test_vdisk_check_repair_does_what_qemu_img_check_repair_does(damage: str, mode: str, written: Path,
                                                                 tmp_path: Path, vd):
    DAMAGES[damage](written)
    twin = tmp_path / "twin.qcow2"
    twin.write_bytes(written.read_bytes())
    theirs = run("qemu-img", "check", "-r", mode, "--output=json", twin, check=False)
    ours = vd("check", "-r", mode, "--output=json", str(written), check=False)
    assert ours.returncode == theirs.returncode, (ours, theirs)
    if theirs.returncode == 1:  # qemu-img needs a refcount rebuild it will not do with -r leaks
        assert "rebuild" in ours.stderr
        assert written.read_bytes() == twin.read_bytes()
        return
    a, b = json.loads(ours.stdout), json.loads(theirs.stdout)
    for key in ("corruptions", "leaks", "leaks-fixed", "corruptions-fixed", "check-errors"):
        assert a.get(key) == b.get(key), (key, a, b)
    after_ours, after_theirs = qemu_img_check(written), qemu_img_check(twin)
    for key in ("corruptions", "leaks"):
        assert after_ours.get(key) == after_theirs.get(key), key
    run("qemu-img", "compare", written, twin)


def test_vdisk_check_repair_human_output_lists_what_was_repaired(written: Path, vd):
    damage_leak(written)
    proc = vd("check", "-r", "leaks", str(written))
    assert proc.returncode == 0
    assert "The following inconsistencies were found and repaired:" in proc.stdout
    assert "1 leaked clusters" in proc.stdout
    assert "No errors were found on the image." in proc.stdout
    assert_clean(written)


def test_vdisk_check_on_a_served_image_needs_force_share(written: Path):
    """A writer holding QEMU's lock bytes makes check refuse without -U, as qemu-img does."""
    # An interactive qemu-io holds the image open read-write (and its lock bytes) while it waits for input.
    writer = subprocess.Popen(["qemu-io", written], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60  # a loaded 2-core CI machine starts qemu-io slowly
        # Wait until qemu-io holds its OFD lock bytes, watching /proc/locks: probing with qemu-img (which takes
        # lock bytes itself) could make qemu-io's own open fail, the race that made this test flaky.
        inode = f":{written.stat().st_ino} "
        while not any("OFDLCK" in line and inode in line for line in Path("/proc/locks").read_text().splitlines()):
            assert writer.poll() is None, "qemu-io exited before taking its locks"
            assert time.monotonic() < deadline, "qemu-io never took its locks"
            time.sleep(0.05)
        time.sleep(0.2)  # qemu-io takes its lock bytes one by one: let it finish
        proc = vdisk("check", str(written), check=False)
        assert_one_line_error(proc, "lock")
        assert vdisk("check", "-U", str(written)).returncode == 0
    finally:
        writer.kill()
        writer.wait()


# --- info and map --------------------------------------------------------------------------------------


def test_vdisk_info_text_is_qemu_img_info_text(chain4: dict[str, Path], vd):
    top = chain4["D"]
    ours = vd("info", "--backing-chain", str(top)).stdout
    theirs = run("qemu-img", "info", "--backing-chain", top).stdout
    strip = lambda text: [l for l in text.splitlines() if not l.startswith("disk size:")]
    assert strip(ours) == strip(theirs)


def test_vdisk_map_json_is_qemu_img_map_json_to_the_byte(chain4: dict[str, Path], vd):
    ours = vd("map", "--output=json", str(chain4["D"])).stdout
    assert ours.strip() == run("qemu-img", "map", "--output=json", chain4["D"]).stdout.strip()


def test_vdisk_map_text_is_qemu_img_map_text(chain4: dict[str, Path], vd):
    # qemu-img's human map refuses compressed clusters (chain4's C has one): compare on B, which has none.
    ours = vd("map", str(chain4["B"])).stdout
    assert ours.strip() == run("qemu-img", "map", chain4["B"]).stdout.strip()


def test_vdisk_info_json_on_a_raw_file(tmp_path: Path, vd):
    run("qemu-img", "create", "-q", "-f", "raw", tmp_path / "d.raw", "1M")
    ours = json.loads(vd("info", "--output=json", str(tmp_path / "d.raw")).stdout)
    theirs = qemu_info(tmp_path / "d.raw")
    assert pick(ours) == pick(theirs)


@pytest.mark.parametrize("command", ["info", "map", "check"])
def test_missing_file_is_one_line_and_exit_1(command: str, tmp_path: Path):
    proc = vdisk(command, str(tmp_path / "nope.qcow2"), check=False)
    assert_one_line_error(proc, "nope.qcow2")


@pytest.mark.parametrize("command", ["info", "map", "check"])
def test_a_file_that_is_not_qcow2_is_one_line_for_check_and_raw_for_info_and_map(command: str, tmp_path: Path, vd):
    path = tmp_path / "junk.img"
    path.write_bytes(b"not an image at all" * 100)
    proc = vd(command, str(path), check=False)
    if command == "check":  # qemu-img check on raw: "This image format does not support checks", exit 63
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    else:
        assert proc.returncode == 0, proc


def test_vdisk_map_on_a_broken_chain_names_the_missing_file(chain4: dict[str, Path], vd):
    chain4["B"].unlink()
    assert_one_line_error(vd("map", str(chain4["D"]), check=False), "B.qcow2", "not found")


@pytest.mark.parametrize("bit", [0, 1], ids=["dirty", "corrupt"])
@pytest.mark.parametrize("mode", ["leaks", "all"])
def test_vdisk_check_repair_opens_dirty_and_corrupt_images_and_clears_the_bit(bit: int, mode: str, written: Path,
                                                                               tmp_path: Path, vd):
    """qemu-img check opens such images read-write unrepaired (BDRV_O_CHECK), repairs, then marks them clean."""
    damage_leak_and_corruption(written)
    with open(written, "r+b") as f:
        f.seek(72)
        f.write(struct.pack(">Q", 1 << bit))
    twin = tmp_path / "twin.qcow2"
    twin.write_bytes(written.read_bytes())
    theirs = run("qemu-img", "check", "-r", mode, "--output=json", twin, check=False)
    ours = vd("check", "-r", mode, "--output=json", str(written), check=False)
    assert ours.returncode == theirs.returncode == 0, (ours, theirs)
    a, b = json.loads(ours.stdout), json.loads(theirs.stdout)
    for key in ("corruptions", "leaks", "leaks-fixed", "corruptions-fixed"):
        assert a.get(key) == b.get(key), (key, a, b)
    assert written.read_bytes()[72:80] == twin.read_bytes()[72:80] == bytes(8)
    assert_clean(written)
