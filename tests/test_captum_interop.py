import torch
from captum.attr import NoiseTunnel
from captum.metrics import sensitivity_max

from captum_vit import AGCAM
from helpers import input_for, make_timm


def test_get_name_and_captum_base_classes():
    from captum.attr import GradientAttribution, LayerAttribution

    a = AGCAM(make_timm("plain"))
    assert a.get_name() == "AGCAM"
    assert isinstance(a, LayerAttribution) and isinstance(a, GradientAttribution)
    assert len(a.layer) == 3  # the attention modules


def test_noise_tunnel_smoothgrad_is_mean_of_noisy_maps():
    model = make_timm("plain")
    x = input_for("plain", batch=2)
    agcam = AGCAM(model)
    torch.manual_seed(5)
    smooth = NoiseTunnel(agcam).attribute(x, nt_type="smoothgrad", nt_samples=4, stdevs=0.1, target=[1, 2])
    assert smooth.shape == (2, 1, 8, 8)
    # Same noise, drawn by hand: NoiseTunnel repeats each input nt_samples times and adds N(0, std).
    torch.manual_seed(5)
    xs = x.repeat_interleave(4, 0)
    noisy = xs + torch.normal(0.0, 0.1, size=xs.shape)
    manual = agcam.attribute(noisy, target=[1] * 4 + [2] * 4).reshape(2, 4, 1, 8, 8).mean(1)
    assert torch.allclose(smooth, manual, atol=1e-5 * manual.abs().max().item())


def test_sensitivity_max_runs_and_is_zero_for_zero_perturbation():
    model = make_timm("plain")
    x = input_for("plain", batch=2)
    agcam = AGCAM(model)
    sens = sensitivity_max(agcam.attribute, x, target=[1, 2], n_perturb_samples=3, perturb_radius=0.05)
    assert sens.shape == (2,) and torch.isfinite(sens).all() and (sens > 0).all()
    zero = sensitivity_max(
        agcam.attribute, x, target=[1, 2], n_perturb_samples=2, perturb_func=lambda inp: inp
    )
    assert torch.allclose(zero, torch.zeros(2), atol=1e-6)
