"""Run a command inside a VM booted from Debian's ``linux-image-amd64`` kernel, for the
datapath this machine's kernel lacks (IPVS: 6.18 here is built without it).

The method is DESIGN.md's, verified on these machines:

* TCG (``-accel tcg -cpu max``): KVM here cannot run a stock kernel (nested KVM
  stalls, or fails on MSR 0x10a).
* The kernel boots uncompressed, through its PVH entry: the xz payload of the
  bzImage is unpacked once (Python's lzma) to an ELF ``vmlinux``, and the initramfs
  is an uncompressed cpio. About 5 s from start to the command.
* The host's root file system is shared read-only over virtio-9p; the initramfs
  mounts it, lays tmpfs over /tmp and /run and writable overlays over /etc, /var,
  /root and /home, and ``switch_root``s into it (not chroot: the kernel's on-demand
  module loading must find the host's /sbin/modprobe and /lib/modules of the VM's
  kernel, which the same package installed). The project's code and tests then run
  inside unchanged.
* The command's output and its exit status come back over two extra serial ports
  (ttyS1, ttyS2); ``poweroff -f`` ends the VM.

busybox's modprobe ignores soft dependencies, so the initramfs loads modules with
insmod in dependency order (crc32c_generic before libcrc32c, should one be needed);
after switch_root the host's kmod modprobe takes over.

Usage: ``python -m tests.vm.qemu 'command'`` (prints the output, exits with the
command's status), or :func:`run` from a test.
"""

from __future__ import annotations

import glob
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("KPR_VM_CACHE", "/var/cache/kpr/vm"))
BOOT_MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
                "virtio_pci", "netfs", "fscache", "9pnet", "9pnet_virtio", "9p", "overlay")
"""Modules the initramfs needs to mount the host's root, in load order (6.1:
virtio and 9p are modules in Debian's kernel)."""


@dataclass(frozen=True)
class Kernel:
    release: str
    """e.g. 6.1.0-56-amd64."""
    vmlinuz: Path
    modules: Path


def find_kernel() -> Kernel | None:
    """The newest Debian kernel image installed under /boot whose modules have IPVS."""
    for vmlinuz in sorted(glob.glob("/boot/vmlinuz-*"), reverse=True):
        release = vmlinuz.split("vmlinuz-", 1)[1]
        mods = Path("/lib/modules") / release
        if list(mods.glob("kernel/net/netfilter/ipvs/ip_vs.ko*")):
            return Kernel(release, Path(vmlinuz), mods)
    return None


def vmlinux(k: Kernel) -> Path:
    """The kernel's ELF image, unpacked from the bzImage's xz payload (cached)."""
    out = CACHE / f"vmlinux-{k.release}"
    if out.exists() and out.stat().st_mtime >= k.vmlinuz.stat().st_mtime:
        return out
    data = k.vmlinuz.read_bytes()
    at = data.find(b"\xfd7zXZ\x00")
    if at < 0:
        raise RuntimeError(f"{k.vmlinuz}: no xz payload (CONFIG_KERNEL_XZ expected)")
    # the payload is followed by the bzImage's trailer: decompress the stream only
    elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[at:])
    if elf[:4] != b"\x7fELF":
        raise RuntimeError(f"{k.vmlinuz}: the xz payload is not an ELF image")
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(elf)
    tmp.rename(out)
    return out


def _cpio(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (path, mode, data); data of a symlink is its target."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], 1):
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08X}" for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0))
        out += hdr.encode() + nb
        out += b"\0" * (-len(out) % 4)
        out += data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /newroot
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
for m in $(/bin/busybox cat /modules.order); do /bin/busybox insmod /modules/$m.ko; done
/bin/busybox mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=1048576,cache=loose \
    hostroot /newroot || { echo "kpr-vm: cannot mount the host root" > /dev/ttyS0; \
    /bin/busybox poweroff -f; }
/bin/busybox mount -t tmpfs tmpfs /newroot/tmp
/bin/busybox mount -t tmpfs tmpfs /newroot/run
for d in etc var root home; do
    /bin/busybox mkdir -p /newroot/run/ov/$d/up /newroot/run/ov/$d/work
    /bin/busybox mount -t overlay overlay -o lowerdir=/newroot/$d,upperdir=/newroot/run/ov/$d/up,workdir=/newroot/run/ov/$d/work /newroot/$d
done
/bin/busybox cp /cmd /newroot/run/kpr-vm-cmd
/bin/busybox umount /proc /sys /dev
exec /bin/busybox switch_root /newroot /bin/sh -c '
exec 2>/dev/ttyS0
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t bpf bpf /sys/fs/bpf 2>/dev/null; mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /dev/shm
ip link set lo up
echo /sbin/modprobe > /proc/sys/kernel/modprobe
sh /run/kpr-vm-cmd > /dev/ttyS1 2>&1
echo "rc=$?" > /dev/ttyS2
sync
poweroff -f'
"""


def initramfs(k: Kernel, command: str, workdir: Path) -> Path:
    busybox = shutil.which("busybox")
    if busybox is None:
        raise RuntimeError("busybox is missing (Debian: busybox-static)")
    entries: list[tuple[str, int, bytes]] = [
        ("bin", 0o40755, b""), ("modules", 0o40755, b""),
        ("bin/busybox", 0o100755, Path(busybox).read_bytes()),
        ("bin/sh", 0o120777, b"busybox"),
        ("init", 0o100755, INIT.encode()),
        ("cmd", 0o100644, command.encode()),
    ]
    order = []
    for m in BOOT_MODULES:
        found = list(k.modules.glob(f"kernel/**/{m}.ko"))
        if not found:
            continue  # built in
        entries.append((f"modules/{m}.ko", 0o100644, found[0].read_bytes()))
        order.append(m)
    entries.append(("modules.order", 0o100644, "\n".join(order).encode() + b"\n"))
    out = workdir / "initramfs.cpio"
    out.write_bytes(_cpio(entries))
    return out


@dataclass(frozen=True)
class Result:
    rc: int
    """The command's exit status (-1: the VM ended without reporting one)."""
    output: str
    """Its stdout and stderr."""
    console: str
    """The kernel's console (boot messages, panics)."""


def run(command: str, timeout: float = 900, memory_mb: int = 2048, cpus: int = 2) -> Result:
    """Boot the VM, run ``command`` with /bin/sh inside, power off."""
    k = find_kernel()
    if k is None:
        raise RuntimeError("no kernel with IPVS modules under /boot (Debian: "
                           "linux-image-amd64)")
    kernel = vmlinux(k)
    with tempfile.TemporaryDirectory(prefix="kpr-vm-") as tmp:
        work = Path(tmp)
        rd = initramfs(k, command, work)
        console, out, rc = work / "console", work / "out", work / "rc"
        argv = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", str(memory_mb),
                "-smp", str(cpus), "-kernel", str(kernel), "-initrd", str(rd),
                "-append", "console=ttyS0 panic=-1 quiet loglevel=4",
                "-nographic", "-no-reboot", "-nodefaults", "-monitor", "none",
                "-fsdev", "local,id=root,path=/,readonly=on,security_model=none,multidevs=remap",
                "-device", "virtio-9p-pci,fsdev=root,mount_tag=hostroot",
                "-serial", f"file:{console}", "-serial", f"file:{out}",
                "-serial", f"file:{rc}"]
        try:
            subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=timeout)
        except subprocess.TimeoutExpired:
            pass  # qemu is killed by run(); what the files hold says what happened
        status = rc.read_text(errors="replace") if rc.exists() else ""
        m = re.search(r"rc=(\d+)", status)
        return Result(int(m.group(1)) if m else -1,
                      out.read_text(errors="replace") if out.exists() else "",
                      console.read_text(errors="replace") if console.exists() else "")


def main() -> int:
    r = run(" ".join(shlex.quote(a) for a in sys.argv[1:]) if len(sys.argv) > 2
            else sys.argv[1])
    sys.stdout.write(r.output)
    if r.rc < 0:
        sys.stdout.write(r.console[-4000:])
    return r.rc if r.rc >= 0 else 1


if __name__ == "__main__":
    sys.exit(main())
