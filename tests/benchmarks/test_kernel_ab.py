"""benchmarks/kernel_ab.py: the renaming of a revision's ops, and the turns the two builds take (the
builds themselves take minutes and run by hand)."""

import pytest

from benchmarks.kernel_ab import in_turns, main, renamed


def test_only_the_op_namespace_is_renamed():
    source = (
        "namespace sluice_cpu_detail {}\n"
        'TORCH_LIBRARY(sluice_cpu, m) { m.def("a(Tensor x) -> Tensor"); }\n'
        "TORCH_LIBRARY_FRAGMENT(sluice_cpu, m) {}\n"
        'TORCH_LIBRARY_IMPL( sluice_cpu, CPU, m) { m.impl("a", &a); }\n'
        "// torch.ops.sluice_cpu.a\n"
    )
    assert renamed(source) == (
        "namespace sluice_cpu_detail {}\n"
        'TORCH_LIBRARY(sluice_ab, m) { m.def("a(Tensor x) -> Tensor"); }\n'
        "TORCH_LIBRARY_FRAGMENT(sluice_ab, m) {}\n"
        'TORCH_LIBRARY_IMPL( sluice_ab, CPU, m) { m.impl("a", &a); }\n'
        "// torch.ops.sluice_cpu.a\n"
    )


def test_the_builds_alternate_which_goes_first():
    calls = []
    old, new = in_turns(lambda: calls.append("old"), lambda: calls.append("new"), rounds=4)
    assert calls == ["old", "new", "new", "old", "old", "new", "new", "old"]
    assert old >= 0 and new >= 0


def test_an_option_of_another_case_is_refused():
    for argv in (["attention", "--rows", "8"], ["int8", "--cache-blocks", "64"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
