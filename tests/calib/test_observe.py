import pytest
import torch
from torch import nn

from lowbit.calib import observe_inputs


def toy_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_observers_see_each_module_input_and_hooks_are_removed():
    model = toy_model().train()
    batches = [torch.randn(5, 8), torch.randn(3, 8) * 2]
    obs = observe_inputs(model, ["0", "2"], batches, "minmax")
    x = torch.cat(batches)
    hidden = torch.relu(model[0](x)).detach()
    assert (obs["0"].min_val, obs["0"].max_val) == (float(x.min()), float(x.max()))
    assert obs["2"].max_val == pytest.approx(float(hidden.max()))
    assert obs["2"].min_val >= 0.0 and obs["0"].n_updates == 2
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert model.training  # mode restored


def test_hooks_are_removed_when_the_forward_fails():
    model = toy_model()
    with pytest.raises(RuntimeError):
        observe_inputs(model, ["0"], [torch.randn(2, 5)], "minmax")  # wrong width
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_bad_names_and_observer_kwargs():
    model = toy_model()
    with pytest.raises(ValueError, match=r"\['nope'\] are not modules"):
        observe_inputs(model, ["nope"], [torch.randn(1, 8)], "minmax")
    with pytest.raises(ValueError, match="unknown observer"):
        observe_inputs(model, ["0"], [torch.randn(1, 8)], "median")
    obs = observe_inputs(model, ["0"], [torch.randn(4, 8)], "percentile",
                         observer_kwargs={"percentile": 99.0})
    assert obs["0"].percentile == 99.0
    with pytest.raises(ValueError, match="module '0'.*NaN"):
        observe_inputs(model, ["0"], [torch.full((1, 8), float("nan"))], "minmax")
