"""One test per redirect that parallel/cpu_compat.py makes for megatron-core on CPU."""

from __future__ import annotations

import pytest
import torch

from distflow_mc.parallel.cpu_compat import apply_cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only redirects")


@pytest.fixture(scope="module", autouse=True)
def compat():
    assert apply_cpu_compat()
    assert apply_cpu_compat()  # idempotent


def test_current_device_is_cpu_and_usable_as_device():
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"


def test_synchronize_is_a_no_op():
    torch.cuda.synchronize()
    torch.cuda.synchronize(0)


def test_rng_tracker_forks_the_cpu_generator():
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(5, tp_rank=0, ep_rank=0, etp_rank=0)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(0)
    outer_before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outer_before)  # outer stream untouched
    tensor_parallel.model_parallel_cuda_manual_seed(5, tp_rank=0, ep_rank=0, etp_rank=0)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        b = torch.rand(3)
    assert torch.equal(a, b)  # same seed, same stream


def test_factories_map_cuda_to_cpu():
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.tensor([1.0], device="cuda:0").device.type == "cpu"
    assert torch.ones_like(torch.zeros(2), device=torch.device("cuda")).device.type == "cpu"
    assert torch.arange(3, device=0).device.type == "cpu"


def test_device_contexts_still_apply_to_wrapped_factories():
    """transformers builds models under `with torch.device("meta")`."""
    with torch.device("meta"):
        assert torch.tensor([1.0]).device.type == "meta"
        assert torch.zeros(2).device.type == "meta"


def test_tensor_cuda_is_identity():
    t = torch.ones(2)
    assert t.cuda() is t


def test_tensor_type_answers_with_cuda_spelling():
    assert torch.ones(2).type() == "torch.cuda.FloatTensor"
    assert torch.ones(2, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(2).type(torch.float64).dtype == torch.float64


def test_streams_and_events_are_inert():
    stream = torch.cuda.Stream()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        pass
    assert event.elapsed_time(torch.cuda.Event()) == 0.0
    assert stream.query() and event.query()
