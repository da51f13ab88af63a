"""Run a command with the bpf() syscall denied (EPERM) by a seccomp filter, as a
locked-down container runtime would: ``nobpf.py PROGRAM ARGS...``.

The filter is inherited across exec and by every thread and child, so the command
cannot use BPF at all. Uses libseccomp's Python binding (Debian python3-seccomp).
"""

import errno
import os
import sys

import seccomp

f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
f.add_rule(seccomp.ERRNO(errno.EPERM), "bpf")
f.load()
os.execvp(sys.argv[1], sys.argv[1:])
