"""Inductor's CPU probe on a thread (sdtm_compile.engines.vec_isa_probe): started once, then cached in the process."""

import pytest
from torch._inductor.cpu_vec_isa import valid_vec_isa_list

from sdtm_compile.engines import vec_isa_probe


@pytest.mark.inductor  # compiles Inductor's C++ test programs (seconds with an empty cache)
def test_the_probe_runs_once_on_its_thread_and_its_answer_is_then_cached():
    vec_isa_probe.start_vec_isa_probe()
    thread = vec_isa_probe._probe
    assert thread is not None
    assert thread.name == "sdtm-vec-isa-probe"
    vec_isa_probe.start_vec_isa_probe()  # a second start (another compile in this process) starts nothing
    assert vec_isa_probe._probe is thread
    vec_isa_probe.wait_for_vec_isa_probe()
    assert not thread.is_alive()
    hits = valid_vec_isa_list.cache_info().hits
    found = valid_vec_isa_list()
    assert valid_vec_isa_list.cache_info().hits == hits + 1  # answered from the thread's run, not probed again
    assert all(isa.bit_width() > 0 for isa in found)
