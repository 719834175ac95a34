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


def test_an_input_comes_back_as_a_copy_and_backward_fetches_the_ones_before_it_in_advance():
    off = offload.ActivationOffloader()
    small = torch.ones(4)
    assert off.pack(small) is small  # under 1 MiB: left where it is
    a, b, c, d = (torch.full((1 << 18,), float(k)) for k in range(4))  # 1 MiB each
    saved = [off.pack(t) for t in (a, b, c, d)]  # outside group(): one group each, as checkpoint inputs
    assert off.offloaded == 4 and off.offloaded_bytes == 4 << 20
    back = off.unpack(saved[3])  # backward asks for the last layer's input first
    assert torch.equal(back, d) and back.data_ptr() != d.data_ptr()
    fetched = [s.group.fetched for s in saved]
    assert fetched == [False, True, True, True]  # the next two are on their way, not the one after
    assert torch.equal(off.unpack(saved[2]), c) and saved[0].group.fetched
    assert torch.equal(off.unpack(saved[1]), b) and torch.equal(off.unpack(saved[0]), a)
    assert all(s.group.gpu == [None] for s in saved)  # nothing left once used
    assert torch.equal(off.unpack(saved[0]), a)  # asked again (a graph kept for a second backward): copied again


def test_backward_fetches_at_most_one_whole_offloaded_layer_ahead():
    off = offload.ActivationOffloader()
    saved = []
    for whole in (True, True, False, True):  # offloaded, offloaded, a checkpointed layer's input, offloaded
        with off.group(whole_layer=whole):
            saved.append([off.pack(torch.full((1 << 18,), float(k))) for k in range(3 if whole else 1)])
    off.unpack(saved[3][0])  # backward starts with the last layer: the two groups before it come too
    assert [s[0].group.fetched for s in saved] == [False, True, True, True]
    off.unpack(saved[2][0])  # the offloaded layer before it is already on its way; not the one before that too
    assert [s[0].group.fetched for s in saved] == [False, True, True, True]
    assert torch.equal(off.unpack(saved[1][2]), torch.full((1 << 18,), 2.0))
    assert saved[0][0].group.fetched


def test_a_layers_tensors_form_one_group_fetched_together_and_each_tensor_is_copied_once():
    weight = torch.zeros(1 << 18)
    off = offload.ActivationOffloader()
    x, y = torch.ones(1 << 18), torch.full((1 << 18,), 2.0)
    with off.group([weight]):
        first = [off.pack(t) for t in (x, y, x, weight, weight.view(512, 512).t())]
    with off.group():
        second = off.pack(torch.full((1 << 18,), 3.0))
    assert first[3] is weight and isinstance(first[4], torch.Tensor)  # weights (and views of them) never move
    assert len({s.group for s in first[:3]}) == 1 and first[2].item == first[0].item  # x saved twice: one copy
    assert off.offloaded == 3 and second.group is not first[0].group
    assert torch.equal(off.unpack(second), torch.full((1 << 18,), 3.0)) and first[0].group.fetched
    assert torch.equal(off.unpack(first[1]), y) and torch.equal(off.unpack(first[0]), x)


def test_tensors_that_are_not_one_dense_block_stay_where_they_are_and_transposes_keep_their_strides():
    off = offload.ActivationOffloader()
    base = torch.arange(1 << 20, dtype=torch.float32).view(1024, 1024)
    every_other = base[:, ::2]  # gaps between its elements
    assert off.pack(every_other) is every_other
    transposed = base.t()  # dense, in another order
    back = off.unpack(off.pack(transposed))
    assert back.stride() == transposed.stride() and torch.equal(back, transposed)


def test_layers_offloaded_whole_give_the_kept_layers_loss_and_gradients(monkeypatch):
    monkeypatch.setattr(offload, "SMALLEST_OFFLOADED", 0)
    model = _lora_model(4)
    ids = torch.randint(3, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    set_checkpointing(model, 0)
    kept_loss, kept = seeded_loss_and_grads(model, ids)
    packs = []
    pack = offload.ActivationOffloader.pack
    monkeypatch.setattr(offload.ActivationOffloader, "pack", lambda self, t: packs.append(t) or pack(self, t))
    offloader = set_checkpointing(model, 1, offload=True, offloaded_layers=2)
    loss, grads = seeded_loss_and_grads(model, ids)
    assert torch.equal(loss, kept_loss)
    assert grads.keys() == kept.keys()
    assert all(torch.equal(g, kept[n]) for n, g in grads.items())  # nothing recomputed: the very same numbers
    # the two offloaded layers' saved activations and the checkpointed layer's input moved; no weight did
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    moved = [t for t in packs if t.untyped_storage().data_ptr() not in weights]
    assert offloader.offloaded > 2 * 5 and offloader.offloaded <= len(moved)
    blocks = [b for b in model.modules() if hasattr(b, "_gradient_checkpointing_func")][-4:]
    assert [b.gradient_checkpointing for b in blocks] == [True, True, True, False]  # the last layer kept


def test_offloaded_layers_are_spread_evenly_among_the_first_layers():
    from tunesmith.train.model import offloaded_positions

    assert offloaded_positions(30, 8) == {1, 5, 9, 13, 16, 20, 24, 28}
    assert offloaded_positions(6, 4) == {0, 2, 3, 5}
    assert offloaded_positions(5, 0) == set() and offloaded_positions(3, 3) == {0, 1, 2}


def test_the_offloader_keeps_nothing_alive_once_the_graph_is_gone():
    off = offload.ActivationOffloader()
    saved = [off.pack(torch.zeros(1 << 18)) for _ in range(3)]
    refs = [weakref.ref(s.group) for s in saved]
    del saved
    gc.collect()
    assert all(r() is None for r in refs)  # a forward abandoned before backward (an out-of-memory retry)
    fresh = off.pack(torch.zeros(1 << 18))
    assert fresh.group.previous() is None


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
    pack = offload.ActivationOffloader.pack
    monkeypatch.setattr(offload.ActivationOffloader, "pack", lambda self, t: packed.append(t.shape) or pack(self, t))
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


def test_a_run_with_layers_offloaded_whole_says_so_and_trains_as_with_them_kept(tiny_model_dir, tmp_path, monkeypatch):
    import json

    from train_fixtures import config, metrics, write_arithmetic
    from tunesmith.train import train

    monkeypatch.setattr(offload, "SMALLEST_OFFLOADED", 0)
    data = write_arithmetic(tmp_path / "data", n_train=16, n_eval=2)
    losses, plans = {}, {}
    for moved in (0, 1):
        run = tmp_path / f"offload-layers-{moved}"
        cfg = config(tiny_model_dir, data, method="lora", max_steps=3, gradient_checkpointing=True,
                     offload_layers=moved, deterministic=True)
        train(cfg, out_dir=run)
        plans[moved] = json.loads((run / "run.json").read_text())["plan"]
        losses[moved] = [m["loss"] for m in metrics(run)]
    assert plans[1]["offloaded_layers"] == 1 and plans[0]["offloaded_layers"] == 0
    assert plans[1]["checkpointed_layers"] == plans[0]["checkpointed_layers"] - 1
    assert len(losses[1]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-6)
