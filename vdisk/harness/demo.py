"""``vdisk demo``: the whole story on an embedded default.

Build a chain [A] -> [B] -> [C] -> [D] with vdisk, serve D over NBD, boot a real (TCG) guest on it, stream
A's descendants into D under the running guest while it writes, and prove that nothing was lost: the guest's
checksums, ``qemu-img check``, ``qemu-img compare`` against a model, and the new chain [A] -> [D].
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vdisk.block.chain import open_chain
from vdisk.formats.qcow2.image import Qcow2Image

MiB = 1 << 20
BLOCK = 65536
GUEST_BLOCKS = 32

GUEST_SCRIPT = """\
echo READY
read go
i=0
for off in {offsets}; do
  dd if=/vdisk/files/data of=/dev/vda bs=65536 skip=$i seek=$off count=1 conv=notrunc 2>/dev/null
  i=$((i+1))
done
sync
echo 3 > /proc/sys/vm/drop_caches
i=0
for off in {offsets}; do
  echo "BLOCK $i $(dd if=/dev/vda bs=65536 skip=$off count=1 2>/dev/null | md5sum | cut -d' ' -f1)"
  i=$((i+1))
done
echo DONE
"""


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


def build_chain(workdir: Path, size: int) -> tuple[dict[str, Path], np.ndarray]:
    """A: every MiB filled with its own byte; B rewrites 25 % of the clusters, C 5 % and zeroes a few,
    D (active) is empty.  Returns the paths and the model of what the guest sees."""
    rng = np.random.default_rng(2026)
    paths = {name: workdir / f"{name}.qcow2" for name in "ABCD"}
    model = np.zeros(size, dtype=np.uint8)
    Qcow2Image.create(str(paths["A"]), size)
    image = Qcow2Image.open(str(paths["A"]))
    for mib in range(size // MiB):
        data = np.full(MiB, (mib * 7 + 1) % 256, dtype=np.uint8)
        image.pwrite(data, mib * MiB)
        model[mib * MiB:(mib + 1) * MiB] = data
    image.close()
    clusters = size // BLOCK
    for name, below, share in (("B", "A", 0.25), ("C", "B", 0.05)):
        Qcow2Image.create(str(paths[name]), size, backing_file=f"{below}.qcow2", backing_format="qcow2")
        top = open_chain(str(paths[name]))
        for cluster in rng.choice(clusters, int(clusters * share), replace=False):
            data = rng.integers(0, 256, BLOCK, dtype=np.uint8)
            top.pwrite(data, int(cluster) * BLOCK)
            model[cluster * BLOCK:(cluster + 1) * BLOCK] = data
        if name == "C":
            for cluster in rng.choice(clusters, 8, replace=False):
                top.write_zeroes(int(cluster) * BLOCK, BLOCK)
                model[cluster * BLOCK:(cluster + 1) * BLOCK] = 0
        top.close()
    Qcow2Image.create(str(paths["D"]), size, backing_file="C.qcow2", backing_format="qcow2")
    return paths, model


def _vdisk(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "vdisk.cli", *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"vdisk {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def _qemu_img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True)


def run_demo(workdir: str | None = None, *, size_mib: int = 256, keep: bool = False) -> int:
    from vdisk.qmp.client import Monitor, wait_for_job
    from vdisk.harness.guest import ensure_guest_artifacts, start_guest

    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="vdisk-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    size = size_mib * MiB
    failures: list[str] = []
    server = None
    try:
        say(f"building the chain [A] -> [B] -> [C] -> [D] ({size_mib} MiB) in {work}")
        paths, model = build_chain(work, size)
        print(_vdisk("info", "--backing-chain", str(paths["D"])).split("\n\n")[0])
        extents = _vdisk("map", "--output=json", str(paths["D"])).count("{")
        print(f"vdisk map: {extents} extents across depths 1-3")

        say("preparing the guest (Debian cloud kernel + busybox initramfs, cached after the first run)")
        ensure_guest_artifacts()

        sock, qmp, pid = work / "nbd.sock", work / "qmp.sock", work / "serve.pid"
        say(f"serving D over NBD at {sock}, QMP at {qmp}")
        server = subprocess.Popen([sys.executable, "-m", "vdisk.cli", "serve", str(paths["D"]), "--socket",
                                   str(sock), "--qmp", str(qmp), "--pid-file", str(pid), "--device", "virtio0"])
        deadline = time.monotonic() + 30
        while not (pid.exists() and qmp.exists()):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("vdisk serve did not start")
            time.sleep(0.05)

        rng = np.random.default_rng(7)
        data = rng.integers(0, 256, GUEST_BLOCKS * BLOCK, dtype=np.uint8).tobytes()
        offsets = [int(o) for o in rng.choice(size // BLOCK, GUEST_BLOCKS, replace=False)]
        script = GUEST_SCRIPT.format(offsets=" ".join(map(str, offsets)))
        say("booting the guest on nbd:unix:" + str(sock))
        with start_guest(f"nbd:unix:{sock}", script, files={"data": data}) as guest, Monitor(str(qmp)) as monitor:
            guest.wait_for("^READY", timeout=120)
            say("guest is up; streaming B and C into D under it (block-stream virtio0 base=A.qcow2)")
            print(monitor.hmp("info block"), end="")
            guest.send_line("go")
            monitor.execute("block-stream", device="virtio0", base="A.qcow2")
            ending = wait_for_job(monitor, "virtio0", show_progress=True, out=sys.stdout)
            if ending["event"] != "BLOCK_JOB_COMPLETED" or "error" in ending:
                failures.append(f"stream ended with {ending}")
            print(monitor.hmp("info block-jobs"), end="")
            guest.wait_for("^DONE", timeout=300)
            result = guest.finish(timeout=120)
        guest_sums = {}
        for line in result.output.splitlines():
            if line.startswith("BLOCK "):
                _, index, digest = line.split()
                guest_sums[int(index)] = digest
        for i, offset in enumerate(offsets):
            block = data[i * BLOCK:(i + 1) * BLOCK]
            model[offset * BLOCK:(offset + 1) * BLOCK] = np.frombuffer(block, dtype=np.uint8)
            if guest_sums.get(i) != hashlib.md5(block).hexdigest():
                failures.append(f"guest read back block {i} wrong")
        say(f"guest wrote and read back {len(guest_sums)}/{GUEST_BLOCKS} blocks during the stream")

        server.send_signal(signal.SIGTERM)
        server.wait(60)
        server = None

        say("checking the result on the host")
        chain_text = _qemu_img("info", "--backing-chain", str(paths["D"])).stdout
        images = [line.split(": ", 1)[1] for line in chain_text.splitlines() if line.startswith("image: ")]
        print("chain now:", " -> ".join(reversed([os.path.basename(i) for i in images])))
        if [os.path.basename(i) for i in images] != ["D.qcow2", "A.qcow2"]:
            failures.append(f"chain is {images}, expected D -> A")
        check = _qemu_img("check", str(paths["D"]))
        print(check.stdout.strip().splitlines()[0])
        if check.returncode != 0:
            failures.append("qemu-img check found problems")
        model_path = work / "model.raw"
        model.tofile(model_path)
        compare = _qemu_img("compare", "-F", "raw", str(paths["D"]), str(model_path))
        print("qemu-img compare D.qcow2 model.raw:", compare.stdout.strip())
        if compare.returncode != 0:
            failures.append("D differs from the model")
    finally:
        if server is not None:
            server.kill()
            server.wait()
        if not keep and not workdir:
            shutil.rmtree(work, ignore_errors=True)
    if failures:
        say("FAILED: " + "; ".join(failures))
        return 1
    say("OK: the guest's data and the chain's data survived the live stream intact")
    return 0
