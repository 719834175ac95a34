"""Checkpointed layers' inputs kept in CPU memory (src/tunesmith/train/offload.py): the same loss and gradients as
plain checkpointing, only the layers' inputs moved, and nothing kept after backward. On the CPU the copies are plain
copies; the CUDA streams are checked in tests/gpu/test_fast_path.py."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from train_fixtures import seeded_loss_and_grads, tiny_lora_model
from tunesmith.train import offload
from tunesmith.train.model import set_checkpointing


def _lora_model(layers: int = 3):
    # dropout on: the recomputation must draw the same masks, offloaded or not
    return tiny_lora_model(layers, dropout=0.1)


def test_offloaded_checkpointing_gives_plain_checkpointings_loss_and_gradients(monkeypatch):
    monkeypatch.setattr(offload, "SMALLEST_OFFLOADED", 0)  # the tiny model's inputs are far under 1 MiB
    model = _lora_model()
    ids = torch.randint(3, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    set_checkpointing(model, 3)
    plain_loss, plain = seeded_loss_and_grads(model, ids)
    offloader = set_checkpointing(model, 2, offload=True)
    loss, grads = seeded_loss_and_grads(model, ids)
    assert offloader.offloaded == 2  # one input per checkpointed layer, nothing from the third (kept) layer
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain.keys() and len(grads) == 3 * 7 * 2
    for name, g in grads.items():
        assert torch.allclose(g, plain[name], atol=1e-6, rtol=1e-5), name
    set_checkpointing(model, 0)
    none_loss, none = seeded_loss_and_grads(model, ids)
    assert torch.allclose(none_loss, loss, atol=1e-6)
    assert all(torch.allclose(none[n], g, atol=1e-6, rtol=1e-5) for n, g in grads.items())


def test_an_input_comes_back_as_a_copy_and_backward_fetches_the_one_before_it_in_advance():
    off = offload.InputOffloader()
    small = torch.ones(4)
    assert off.pack(small) is small  # under 1 MiB: left where it is
    a, b, c = (torch.full((1 << 18,), float(k)) for k in range(3))  # 1 MiB each
    saved = [off.pack(t) for t in (a, b, c)]
    assert off.offloaded == 3
    back = off.unpack(saved[2])  # backward asks for the last layer's input first
    assert torch.equal(back, c) and back.data_ptr() != c.data_ptr()
    assert saved[1].gpu is not None and saved[0].gpu is None  # the next one is on its way, not the one after
    assert torch.equal(off.unpack(saved[1]), b) and saved[0].gpu is not None
    assert torch.equal(off.unpack(saved[0]), a)
    assert all(s.used and s.gpu is None for s in saved)


def test_the_offloader_keeps_nothing_alive_once_the_graph_is_gone():
    off = offload.InputOffloader()
    saved = [off.pack(torch.zeros(1 << 18)) for _ in range(3)]
    refs = [weakref.ref(s) for s in saved]
    del saved
    gc.collect()
    assert all(r() is None for r in refs)  # a forward abandoned before backward (an out-of-memory retry)
    fresh = off.pack(torch.zeros(1 << 18))
    assert fresh.previous() is None


@pytest.mark.parametrize("layers", [0, 2])
def test_no_offloader_without_checkpointed_layers_or_without_offload(layers):
    model = _lora_model(2)
    assert set_checkpointing(model, layers) is None
    if layers:
        assert set_checkpointing(model, layers, offload=True) is not None


def test_a_run_with_offloaded_checkpoints_says_so_and_trains_as_without(tiny_model_dir, tmp_path, monkeypatch):
    import json

    from train_fixtures import config, metrics, write_arithmetic
    from tunesmith.train import train

    monkeypatch.setattr(offload, "SMALLEST_OFFLOADED", 0)
    packed = []
    pack = offload.InputOffloader.pack
    monkeypatch.setattr(offload.InputOffloader, "pack", lambda self, t: packed.append(t.shape) or pack(self, t))
    data = write_arithmetic(tmp_path / "data", n_train=16, n_eval=2)
    losses = {}
    for moved in (False, True):
        run = tmp_path / f"offload-{moved}"
        cfg = config(tiny_model_dir, data, method="lora", max_steps=3, gradient_checkpointing=True,
                     offload_checkpoints=moved, deterministic=True)
        train(cfg, out_dir=run)
        assert json.loads((run / "run.json").read_text())["plan"]["offload_checkpoints"] is moved
        losses[moved] = [m["loss"] for m in metrics(run)]
    assert len(losses[True]) == 3 and losses[True] == pytest.approx(losses[False], rel=1e-6)
    assert packed and len(packed) % 2 == 0  # both layers' inputs, every micro-batch of the offloaded run only
