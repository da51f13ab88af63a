"""Kernel facts and low-level access: headers for bcc, bpffs, and bpf() commands that
bcc's Python binding does not expose (object get/info, BPF_PROG_TEST_RUN).

Kernel headers: bcc compiles BPF C at start-up against kernel headers. Many hosts run
a kernel without a matching headers package (this project's CI machines do), so
:func:`ensure_bcc_headers` resolves, in order:

1. ``/lib/modules/$(uname -r)/build``: bcc finds it itself; nothing to do.
2. ``/sys/kernel/kheaders.tar.xz`` (CONFIG_IKHEADERS): unpacked once into the cache.
3. A distribution headers package (Debian ``linux-headers-amd64``): its ``-common``
   and arch trees are merged into a symlink farm in the cache (``cp -rs``), and
   ``BCC_KERNEL_SOURCE`` points there.

The programs use only UAPI definitions (``__sk_buff``, ``iphdr``, ``tcphdr``), which are
stable, so headers of another kernel version are fine. Nothing is written under
/lib/modules.
"""

from __future__ import annotations

import ctypes as ct
import errno
import logging
import os
import platform
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CACHE_DIR = Path(os.environ.get("KPR_CACHE_DIR", "/var/cache/kpr"))
BPFFS = Path("/sys/fs/bpf")


class KernelHeadersError(RuntimeError):
    """No kernel headers usable by bcc were found."""


@dataclass(frozen=True, slots=True)
class Headers:
    """Where bcc will find kernel headers."""

    path: Path
    """Directory handed to bcc (BCC_KERNEL_SOURCE), or the modules build dir."""
    how: str
    """Which resolution step found it: modules, kheaders or package."""


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", name))


def _package_headers(src: Path = Path("/usr/src")) -> tuple[Path, Path] | None:
    """Newest (arch tree, common tree) pair of Debian-style header packages."""
    arch = platform.machine()
    suffix = {"x86_64": "amd64", "aarch64": "arm64"}.get(arch, arch)
    best: tuple[Path, Path] | None = None
    for d in sorted(src.glob(f"linux-headers-*-{suffix}"), key=lambda p: _version_key(p.name)):
        common = d.with_name(d.name[: -len(suffix)] + "common")
        if (d / "include").is_dir() and (common / "include").is_dir():
            best = (d, common)
    return best


def _publish(tmp: Path, dest: Path) -> None:
    """Rename a finished tree into place. Two processes preparing it at once (the
    first start of kpr beside a test run) both finish; the second's rename then
    fails on the first's tree (ENOTEMPTY), which is as good as its own."""
    try:
        tmp.rename(dest)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not (dest / "include").is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _build_farm(arch_dir: Path, common_dir: Path, dest: Path) -> None:
    """Merge two header trees into ``dest`` as symlinks, atomically."""
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        subprocess.run(["cp", "-rs", f"{common_dir}/.", str(tmp)], check=True)
        subprocess.run(["cp", "-rsf", f"{arch_dir}/.", str(tmp)], check=True)
        _publish(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_headers(cache_dir: Path | None = None) -> Headers:
    """Find (or prepare) kernel headers for bcc; see the module docstring."""
    cache_dir = cache_dir or CACHE_DIR
    release = os.uname().release
    build = Path(f"/lib/modules/{release}/build")
    if (build / "include").is_dir():
        return Headers(build, "modules")

    kheaders = Path("/sys/kernel/kheaders.tar.xz")
    if kheaders.exists():
        dest = cache_dir / f"kheaders-{release}"
        if not (dest / "include").is_dir():
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix="kheaders.", dir=cache_dir))
            with tarfile.open(kheaders) as tf:
                tf.extractall(tmp, filter="data")
            _publish(tmp, dest)
        return Headers(dest, "kheaders")

    pair = _package_headers()
    if pair is not None:
        arch_dir, common_dir = pair
        dest = cache_dir / f"headers-{arch_dir.name}"
        if not (dest / "include").is_dir():
            cache_dir.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                shutil.rmtree(dest)
            _build_farm(arch_dir, common_dir, dest)
            log.info("kernel headers: merged %s and %s into %s", common_dir.name,
                     arch_dir.name, dest)
        return Headers(dest, "package")

    raise KernelHeadersError(
        f"no kernel headers for bcc: none of /lib/modules/{release}/build, "
        f"/sys/kernel/kheaders.tar.xz or /usr/src/linux-headers-*. Install them, "
        f"e.g. 'apt-get install linux-headers-amd64' (Debian; any version works), "
        f"or boot a kernel built with CONFIG_IKHEADERS.")


def ensure_bcc_headers() -> Headers:
    """Resolve headers and point bcc at them (before the first BPF() call)."""
    h = resolve_headers()
    if h.how != "modules":
        os.environ["BCC_KERNEL_SOURCE"] = str(h.path)
    return h


def ensure_bpffs(path: Path = BPFFS) -> None:
    """Mount bpffs at /sys/fs/bpf when it is not mounted (as Cilium does)."""
    if os.path.ismount(path):
        return
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "bpf", "bpf", str(path)], check=True)
    log.info("mounted bpffs at %s", path)


# ----- raw bpf() -------------------------------------------------------------------

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_ENABLE_STATS = 32
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29

_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long


def sys_bpf(cmd: int, attr: ct.Structure) -> int:
    """bpf(cmd, &attr, sizeof attr); raises OSError on failure."""
    ret = _libc.syscall(_SYS_BPF, cmd, ct.byref(attr), ct.sizeof(attr))
    if ret < 0:
        e = ct.get_errno()
        raise OSError(e, os.strerror(e))
    return int(ret)


# ----- map elements and batches, without libbcc ----------------------------------------
# Loading libbcc.so (linked against LLVM 14 and libclang-cpp 14 on Debian 12) costs the
# controller 61 MB of RSS before any map exists; only the compile step, in a process of
# its own (controller.datapaths.ebpf.build), needs it. These mirror libbpf's calls:
# they return the syscall's result (0, or -1 with ctypes' errno set) rather than raise,
# because batch callers read how far the kernel got before an error.

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_DELETE_BATCH = 27


class _ElemAttr(ct.Structure):
    _fields_ = [("map_fd", ct.c_uint32), ("pad", ct.c_uint32), ("key", ct.c_uint64),
                ("value", ct.c_uint64), ("flags", ct.c_uint64)]


class _BatchAttr(ct.Structure):
    _fields_ = [("in_batch", ct.c_uint64), ("out_batch", ct.c_uint64), ("keys", ct.c_uint64),
                ("values", ct.c_uint64), ("count", ct.c_uint32), ("map_fd", ct.c_uint32),
                ("elem_flags", ct.c_uint64), ("flags", ct.c_uint64)]


def _raw(cmd: int, attr: ct.Structure) -> int:
    return int(_libc.syscall(_SYS_BPF, cmd, ct.byref(attr), ct.sizeof(attr)))


def _ptr(obj: Any) -> int:
    return 0 if obj is None else ct.addressof(obj)


def map_lookup_elem(fd: int, key: Any, value: Any) -> int:
    return _raw(BPF_MAP_LOOKUP_ELEM, _ElemAttr(map_fd=fd, key=_ptr(key), value=_ptr(value)))


def map_update_elem(fd: int, key: Any, value: Any, flags: int = 0) -> int:
    return _raw(BPF_MAP_UPDATE_ELEM, _ElemAttr(map_fd=fd, key=_ptr(key), value=_ptr(value),
                                               flags=flags))


def map_delete_elem(fd: int, key: Any) -> int:
    return _raw(BPF_MAP_DELETE_ELEM, _ElemAttr(map_fd=fd, key=_ptr(key)))


def map_get_next_key(fd: int, key: Any, next_key: Any) -> int:
    """``key`` None: the first key."""
    return _raw(BPF_MAP_GET_NEXT_KEY, _ElemAttr(map_fd=fd, key=_ptr(key), value=_ptr(next_key)))


def map_batch(cmd: int, fd: int, keys: Any, values: Any, count: ct.c_uint32,
              in_batch: Any = None, out_batch: Any = None) -> int:
    """BPF_MAP_{LOOKUP,UPDATE,DELETE}_BATCH; ``count`` is set to the elements done."""
    attr = _BatchAttr(in_batch=_ptr(in_batch), out_batch=_ptr(out_batch), keys=_ptr(keys),
                      values=_ptr(values), count=count.value, map_fd=fd)
    ret = _raw(cmd, attr)
    count.value = attr.count
    return ret


class _ObjAttr(ct.Structure):
    _fields_ = [("pathname", ct.c_uint64), ("bpf_fd", ct.c_uint32),
                ("file_flags", ct.c_uint32), ("path_fd", ct.c_int32), ("pad", ct.c_uint32)]


class _InfoAttr(ct.Structure):
    _fields_ = [("bpf_fd", ct.c_uint32), ("info_len", ct.c_uint32), ("info", ct.c_uint64)]


class MapInfo(ct.Structure):
    """The head of struct bpf_map_info (include/uapi/linux/bpf.h)."""

    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32),
                ("map_flags", ct.c_uint32), ("name", ct.c_char * 16),
                ("ifindex", ct.c_uint32), ("btf_vmlinux_value_type_id", ct.c_uint32),
                ("netns_dev", ct.c_uint64), ("netns_ino", ct.c_uint64),
                ("btf_id", ct.c_uint32), ("btf_key_type_id", ct.c_uint32),
                ("btf_value_type_id", ct.c_uint32)]


class _LinkCreateAttr(ct.Structure):
    _fields_ = [("prog_fd", ct.c_uint32), ("target_fd", ct.c_uint32),
                ("attach_type", ct.c_uint32), ("flags", ct.c_uint32),
                ("pad", ct.c_uint64 * 4)]


class _LinkUpdateAttr(ct.Structure):
    _fields_ = [("link_fd", ct.c_uint32), ("new_prog_fd", ct.c_uint32),
                ("flags", ct.c_uint32), ("old_prog_fd", ct.c_uint32)]


class _MapCreateAttr(ct.Structure):
    _fields_ = [("map_type", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32),
                ("map_flags", ct.c_uint32), ("pad", ct.c_uint32 * 11)]


def bpf_usable() -> str:
    """"" when this process may use bpf() (it creates and closes a one-entry array
    map), else why not: the syscall denied (seccomp, unprivileged, lockdown) or
    missing."""
    try:
        fd = sys_bpf(0, _MapCreateAttr(map_type=2, key_size=4, value_size=4,  # MAP_CREATE,
                                       max_entries=1))                        # ARRAY
    except OSError as e:
        return f"the bpf() syscall fails: {e.strerror} (errno {e.errno})"
    os.close(fd)
    return ""


def obj_pin(fd: int, path: Path) -> None:
    """Pin a BPF object (map, program or link) at a bpffs path."""
    raw = ct.create_string_buffer(os.fsencode(str(path)))
    sys_bpf(BPF_OBJ_PIN, _ObjAttr(pathname=ct.addressof(raw), bpf_fd=fd))


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """BPF_LINK_CREATE (kernel 5.7+ for cgroups); returns the link's fd."""
    return sys_bpf(BPF_LINK_CREATE, _LinkCreateAttr(prog_fd=prog_fd, target_fd=target_fd,
                                                    attach_type=attach_type))


def link_update(link_fd: int, prog_fd: int) -> None:
    """Swap the program behind a link atomically (BPF_LINK_UPDATE)."""
    sys_bpf(BPF_LINK_UPDATE, _LinkUpdateAttr(link_fd=link_fd, new_prog_fd=prog_fd))


_HZ_VALUES = (100, 250, 300, 1000)  # the CONFIG_HZ choices (kernel/Kconfig.hz)
_HZ: list[int] = []  # found once per process


def clock_hz() -> int:
    """The kernel's tick rate (CONFIG_HZ), for the programs' jiffies clock; 0 when it
    cannot be found. From the running kernel's config (/proc/config.gz, then
    /boot/config-<release>), else measured: jiffies from /proc/timer_list over
    0.2 s, which must land within 5% of a CONFIG_HZ choice (Cilium measures it the
    same way, from /proc/schedstat, which needs CONFIG_SCHEDSTATS)."""
    if not _HZ:
        _HZ.append(_config_hz() or _measured_hz())
        log.info("kernel tick rate: %s", _HZ[0] or "unknown (flows use the ns clock)")
    return _HZ[0]


def _config_hz() -> int:
    import gzip

    for path, opener in ((Path("/proc/config.gz"), gzip.open),
                         (Path(f"/boot/config-{platform.release()}"), open)):
        try:
            with opener(path, "rt") as f:  # type: ignore[operator]
                m = re.search(r"^CONFIG_HZ=(\d+)$", f.read(), re.M)
        except OSError:
            continue
        if m and int(m.group(1)) in _HZ_VALUES:
            return int(m.group(1))
    return 0


def jiffies() -> int | None:
    """The kernel's jiffies counter now (bpf_jiffies64's clock), from /proc/timer_list;
    None when unreadable."""
    try:
        with open("/proc/timer_list") as f:
            for line in f:
                if line.startswith("jiffies: "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _measured_hz(span: float = 0.2) -> int:
    import time

    t0, j0 = time.monotonic(), jiffies()
    time.sleep(span)
    t1, j1 = time.monotonic(), jiffies()
    if j0 is None or j1 is None or t1 <= t0:
        return 0
    rate = (j1 - j0) / (t1 - t0)
    best = min(_HZ_VALUES, key=lambda hz: abs(hz - rate))
    return best if abs(best - rate) <= 0.05 * best else 0


def cgroup2_mount() -> Path | None:
    """The first cgroup v2 mount point (/sys/fs/cgroup on unified hosts,
    /sys/fs/cgroup/unified on hybrid ones), from /proc/self/mountinfo."""
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            return Path(left.split()[4])
    return None


def obj_get(path: Path) -> int:
    """Open a pinned BPF object; returns a new fd."""
    raw = ct.create_string_buffer(os.fsencode(str(path)))
    return sys_bpf(BPF_OBJ_GET, _ObjAttr(pathname=ct.addressof(raw)))


def possible_cpus() -> int:
    """CPUs a per-CPU map has a slot for (/sys/devices/system/cpu/possible: "0-3,8")."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


def map_info(fd: int) -> MapInfo:
    """Type, key/value size and capacity of an open map."""
    info = MapInfo()
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ct.sizeof(info),
                                              info=ct.addressof(info)))
    return info


BPF_MAP_CREATE = 0
BPF_PROG_GET_NEXT_ID = 11
BPF_PROG_GET_FD_BY_ID = 13
BPF_BTF_GET_FD_BY_ID = 19


class _IdAttr(ct.Structure):
    _fields_ = [("id", ct.c_uint32), ("next_id", ct.c_uint32), ("open_flags", ct.c_uint32)]


class _ProgInfo(ct.Structure):
    """The head of struct bpf_prog_info, up to map_ids and name."""

    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_uint8 * 8),
                ("jited_prog_len", ct.c_uint32), ("xlated_prog_len", ct.c_uint32),
                ("jited_prog_insns", ct.c_uint64), ("xlated_prog_insns", ct.c_uint64),
                ("load_time", ct.c_uint64), ("created_by_uid", ct.c_uint32),
                ("nr_map_ids", ct.c_uint32), ("map_ids", ct.c_uint64),
                ("name", ct.c_char * 16)]


def maps_in_use() -> set[int]:
    """The ids of every map some loaded program uses (every program of the kernel,
    whoever loaded it: the ids are global, so a pin directory's maps can be checked
    against them whichever namespace attached the programs)."""
    used: set[int] = set()
    attr = _IdAttr()
    while _raw(BPF_PROG_GET_NEXT_ID, attr) == 0:
        attr.id = attr.next_id
        try:
            fd = sys_bpf(BPF_PROG_GET_FD_BY_ID, _IdAttr(id=attr.next_id))
        except OSError:
            continue  # unloaded meanwhile
        try:
            ids = (ct.c_uint32 * 64)()
            info = _ProgInfo(nr_map_ids=64, map_ids=ct.addressof(ids))
            sys_bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ct.sizeof(info),
                                                      info=ct.addressof(info)))
            used.update(ids[:min(info.nr_map_ids, 64)])
        finally:
            os.close(fd)
    return used


class _MapCreateNamed(ct.Structure):
    _fields_ = [("map_type", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32),
                ("map_flags", ct.c_uint32), ("inner_map_fd", ct.c_uint32),
                ("numa_node", ct.c_uint32), ("map_name", ct.c_char * 16),
                ("map_ifindex", ct.c_uint32), ("btf_fd", ct.c_uint32),
                ("btf_key_type_id", ct.c_uint32), ("btf_value_type_id", ct.c_uint32),
                ("pad", ct.c_uint32 * 4)]


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int,
               flags: int = 0, name: str = "") -> int:
    """BPF_MAP_CREATE; returns the new map's fd. ``name``: its kernel name (15
    characters at most are kept, as bcc and libbpf do)."""
    return sys_bpf(BPF_MAP_CREATE, _MapCreateNamed(
        map_type=map_type, key_size=key_size, value_size=value_size,
        max_entries=max_entries, map_flags=flags, map_name=name.encode()[:15]))


def map_create_like(fd: int, max_entries: int, name: str = "") -> int:
    """A new map like the open map ``fd`` (type, key, value, flags, and its BTF key
    and value types), with room for ``max_entries``; returns its fd.

    The BTF matters where the new map goes into a map-in-map slot whose template bcc
    created: kernels before 6.2 compare the inner map's timer_off, which is -ENOENT
    for a map with a BTF value type that has no timer and -EINVAL for one without
    BTF, so a BTF-less map is refused (EINVAL) on Debian 12's 6.1."""
    info = map_info(fd)
    attr = _MapCreateNamed(map_type=info.type, key_size=info.key_size,
                           value_size=info.value_size, max_entries=max_entries,
                           map_flags=info.map_flags, map_name=name.encode()[:15])
    btf = -1
    if info.btf_id:
        try:
            btf = sys_bpf(BPF_BTF_GET_FD_BY_ID, _IdAttr(id=info.btf_id))
        except OSError as e:
            log.debug("map %s: its BTF %d cannot be opened (%s); created without",
                      name, info.btf_id, e)
    if btf >= 0:
        attr.btf_fd, attr.btf_key_type_id = btf, info.btf_key_type_id
        attr.btf_value_type_id = info.btf_value_type_id
    try:
        return sys_bpf(BPF_MAP_CREATE, attr)
    finally:
        if btf >= 0:
            os.close(btf)


def pinned_map_info(path: Path) -> MapInfo | None:
    """Key/value size and capacity of a pinned map, or None when not pinned."""
    try:
        fd = obj_get(path)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    try:
        return map_info(fd)
    finally:
        os.close(fd)


class _TestRunAttr(ct.Structure):
    _fields_ = [("prog_fd", ct.c_uint32), ("retval", ct.c_uint32),
                ("data_size_in", ct.c_uint32), ("data_size_out", ct.c_uint32),
                ("data_in", ct.c_uint64), ("data_out", ct.c_uint64),
                ("repeat", ct.c_uint32), ("duration", ct.c_uint32),
                ("ctx_size_in", ct.c_uint32), ("ctx_size_out", ct.c_uint32),
                ("ctx_in", ct.c_uint64), ("ctx_out", ct.c_uint64),
                ("flags", ct.c_uint32), ("cpu", ct.c_uint32),
                ("batch_size", ct.c_uint32), ("pad", ct.c_uint32)]


@dataclass(frozen=True, slots=True)
class TestRun:
    """Outcome of BPF_PROG_TEST_RUN."""

    retval: int
    """The program's return value (TC_ACT_*)."""
    data: bytes
    """The packet as the program left it."""
    duration_ns: int
    """Mean run time per repetition, as the kernel measured it."""


class _ProgLoadAttr(ct.Structure):
    _fields_ = [("prog_type", ct.c_uint32), ("insn_cnt", ct.c_uint32), ("insns", ct.c_uint64),
                ("license", ct.c_uint64), ("log_level", ct.c_uint32), ("log_size", ct.c_uint32),
                ("log_buf", ct.c_uint64), ("kern_version", ct.c_uint32),
                ("prog_flags", ct.c_uint32), ("prog_name", ct.c_char * 16)]


BPF_PROG_TYPE_SCHED_CLS = 3


def load_empty_tc_prog() -> int:
    """A tc program that only returns TC_ACT_OK (r0 = 0; exit), loaded without bcc.
    A test run of it times BPF_PROG_TEST_RUN's own loop (bh disable/enable, the
    dispatch), which a program's test run includes: the difference is the program's
    own cost, what bpf_stats' run_time_ns measures on live traffic. The caller
    closes the fd."""
    insns = ct.create_string_buffer(bytes.fromhex("b700000000000000" "9500000000000000"), 16)
    lic = ct.create_string_buffer(b"GPL")
    return sys_bpf(BPF_PROG_LOAD, _ProgLoadAttr(
        prog_type=BPF_PROG_TYPE_SCHED_CLS, insn_cnt=2, insns=ct.addressof(insns),
        license=ct.addressof(lic), prog_name=b"kpr_empty"))


def prog_test_run(prog_fd: int, packet: bytes, repeat: int = 1) -> TestRun:
    """Run a loaded program on one packet in the kernel (BPF_PROG_TEST_RUN)."""
    inb = ct.create_string_buffer(packet, len(packet))
    out_size = len(packet) + 256
    outb = ct.create_string_buffer(out_size)
    attr = _TestRunAttr(prog_fd=prog_fd, data_size_in=len(packet), data_size_out=out_size,
                        data_in=ct.addressof(inb), data_out=ct.addressof(outb),
                        repeat=repeat)
    sys_bpf(BPF_PROG_TEST_RUN, attr)
    return TestRun(attr.retval, outb.raw[: attr.data_size_out], attr.duration)


class TestRunner:
    """BPF_PROG_TEST_RUN over many variants of one packet, without a Python object
    per run: the input buffer is patched in place (``patch``) between runs. For
    floods of synthetic packets in tests (a million SYNs take seconds)."""

    __test__ = False  # not a pytest class

    def __init__(self, prog_fd: int, packet: bytes) -> None:
        self.inb = ct.create_string_buffer(packet, len(packet))
        self.size = len(packet) + 256
        self.outb = ct.create_string_buffer(self.size)
        self.attr = _TestRunAttr(prog_fd=prog_fd, data_size_in=len(packet),
                                 data_in=ct.addressof(self.inb),
                                 data_out=ct.addressof(self.outb), repeat=1)

    def patch(self, offset: int, raw: bytes) -> None:
        ct.memmove(ct.addressof(self.inb) + offset, raw, len(raw))

    def run(self) -> int:
        """One run of the current packet; its verdict."""
        self.attr.data_size_out = self.size
        if _raw(BPF_PROG_TEST_RUN, self.attr) != 0:
            e = ct.get_errno()
            raise OSError(e, os.strerror(e))
        return int(self.attr.retval)
