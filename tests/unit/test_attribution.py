"""benchmarks/attribution.py's reading of ``perf script`` output (the
measurement itself needs perf and a server: docs/performance.md)."""

from __future__ import annotations

from benchmarks.attribution import _bucket, _samples

# Three samples in perf script's format: one in safepool's Python, one in
# the kernel under sendto, one outside the workload's window.
SCRIPT = """\
python 100 10.500000:    1000000 cpu-clock:
\t    7f01 _PyEval_EvalFrameDefault+0x12 (/usr/lib/libpython3.12.so.1.0)
\t    7f02 py::Leaser.end_lease:/work/safepool/_leasing.py+0x9 (/tmp/perf-100.map)
\t    7f03 py::Handle._run:/usr/lib/python3.12/asyncio/events.py+0x9 (/tmp/perf-100.map)

python 100 10.600000:    1000000 cpu-clock:
\tffffffff81 _raw_spin_unlock_irqrestore+0x1d ([kernel.kallsyms])
\tffffffff82 sock_def_readable+0x40 ([kernel.kallsyms])
\tffffffff83 __x64_sys_sendto+0x20 ([kernel.kallsyms])
\t    7f04 __send+0x10 (/usr/lib/libc.so.6)
\t    7f05 py::_SelectorSocketTransport.write:/usr/lib/python3.12/asyncio/selector_events.py+0x9 (/tmp/perf-100.map)

python 100 12.000000:    1000000 cpu-clock:
\t    7f06 py::LeanPool._put:/work/benchmarks/_workloads.py+0x9 (/tmp/perf-100.map)
"""


def test_samples_keep_the_window_and_bucket_by_innermost_python_or_syscall() -> None:
    stacks = list(_samples(SCRIPT, 10.0, 11.0))
    assert [_bucket(stack) for stack in stacks] == [("safepool", "Leaser.end_lease"), ("kernel: sendto", "sendto")]
    assert [_bucket(stack) for stack in _samples(SCRIPT, 11.5, 12.5)] == [("lean pool", "LeanPool._put")]


def test_a_kernel_sample_outside_the_three_syscalls_and_a_sample_without_python() -> None:
    assert _bucket([("exc_page_fault", "[kernel.kallsyms]")]) == ("kernel: other", "")
    assert _bucket([("_PyObject_Malloc", "libpython3.12.so.1.0")]) == ("other", "")
    assert _bucket([("py::f:/srv/app.py", "perf-1.map")]) == ("other Python", "f")
