"""The model cut into pipeline layers (mirl_ds.models.pipeline_layers), run in one process."""
from __future__ import annotations

import pytest
import torch

from mirl_ds.build import build_pretrain_model
from mirl_ds.config.loader import load_config
from mirl_ds.models.pipeline_layers import LossHead, SegmentLayer, run_layers, segment_layers


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_pretrain_model(load_config(["demo"], []))


@pytest.mark.parametrize("overrides", [[], ["objective.did=off"], ["objective.did=first", "objective.segments=6"]],
                         ids=["did", "did-off", "did-first-g6"])
def test_layers_in_sequence_give_the_models_loss_for_the_same_seed(overrides):
    torch.manual_seed(0)
    model = build_pretrain_model(load_config(["demo"], overrides))
    imgs = torch.randn(2, 3, model.spec.img_size, model.spec.img_size)
    plain = model(imgs, torch.Generator().manual_seed(123))
    head = LossHead(model)
    loss = head(run_layers(segment_layers(model), imgs, torch.tensor([123])), imgs)
    assert float(loss.detach()) == float(plain.loss.detach())
    assert head.last_terms == {k: float(v.detach()) for k, v in plain.terms.items()}


def test_recomputed_blocks_give_the_same_loss_and_gradients(model):
    imgs = torch.randn(2, 3, model.spec.img_size, model.spec.img_size)
    grads = []
    for recompute in (False, True):
        model.zero_grad()
        model.checkpoint_blocks = recompute
        model(imgs, torch.Generator().manual_seed(5)).loss.backward()
        grads.append([p.grad.clone() for p in model.encoder.blocks.parameters()])
    model.checkpoint_blocks = False
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_one_floating_tensor_crosses_each_segment_boundary(model):
    """DeepSpeed runs one backward per floating tensor a stage sends: the boundary packs them."""
    imgs = torch.randn(2, 3, model.spec.img_size, model.spec.img_size)
    x: tuple = (imgs, torch.tensor([7]))
    for layer in segment_layers(model)[:-1]:
        x = layer(x)
        if isinstance(layer, SegmentLayer):
            assert [t.is_floating_point() for t in x] == [True, False, False]
            assert all(t.is_contiguous() for t in x)


def test_every_layer_tensor_maps_to_the_equal_model_tensor(model):
    state = model.state_dict()
    mapped = set()
    for layer in segment_layers(model):
        if isinstance(layer, SegmentLayer):
            for key, value in layer.state_dict().items():
                name = layer.model_key(key)
                assert torch.equal(value, state[name]), (key, name)
                mapped.add(name)
    assert set(state) - mapped == {"mask_token"}     # the tied token is its own layer
