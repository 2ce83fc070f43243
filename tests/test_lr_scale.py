"""``Tower(lr_scale=...)``: a tower's projector in its own optimizer parameter group at a scaled learning rate."""

from __future__ import annotations

import pytest

from mmalign.recipe import build, load_config


def _module(scale: float | None, scheduler: bool = False):
    cfg = load_config("lit_contrastive", variant="tiny")
    if scale is not None:
        cfg["model"]["init_args"]["towers"]["text"]["init_args"]["lr_scale"] = scale
    if scheduler:
        cfg["model"]["init_args"]["scheduler"] = {"class_path": "torch.optim.lr_scheduler.CosineAnnealingLR",
                                                  "init_args": {"T_max": 10}}
    model, _ = build(cfg, seed=0)
    return model


def test_scaled_tower_trains_in_its_own_group_at_the_scaled_rate():
    plain = _module(None).configure_optimizers()
    assert len(plain.param_groups) == 1
    base_lr = plain.param_groups[0]["lr"]
    model = _module(0.1)
    opt = model.configure_optimizers()
    assert [g.get("tower") for g in opt.param_groups] == [None, "text"]
    rest, text = opt.param_groups
    assert rest["lr"] == base_lr and text["lr"] == pytest.approx(0.1 * base_lr)
    text_ids = {id(p) for p in model.towers["text"].projector.parameters() if p.requires_grad}
    assert {id(p) for p in text["params"]} == text_ids and text_ids.isdisjoint({id(p) for p in rest["params"]})
    # every trainable parameter is in exactly one group
    assert sorted(id(p) for g in opt.param_groups for p in g["params"]) == sorted(id(p) for p in model.trainable_parameters())


def test_scheduler_scales_both_groups_alike():
    out = _module(0.25, scheduler=True).configure_optimizers()
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    start = [g["lr"] for g in opt.param_groups]
    assert start[1] == pytest.approx(0.25 * start[0])
    for _ in range(5):
        opt.step()
        sched.step()
    now = [g["lr"] for g in opt.param_groups]
    assert now[0] < start[0] and now[1] == pytest.approx(0.25 * now[0])


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_lr_scale_must_be_positive_and_finite(bad):
    from mmalign.training.towers import Tower

    with pytest.raises(ValueError, match="'text': lr_scale must be a positive finite number"):
        Tower(None, field="text", lr_scale=bad)  # checked before the encoder is touched
