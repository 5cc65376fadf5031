import pytest
import torch

from fsmeta.models import ARCHITECTURES, build_model, count_parameters, is_bn_affine, make_bn_affine


@pytest.mark.parametrize("arch,expected", [("fcrn", 985_665), ("unet", 470_977)])
def test_parameter_counts_with_non_affine_bn(arch, expected):
    model = build_model(arch)
    assert count_parameters(model) == expected
    assert not is_bn_affine(model)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("h,w", [(64, 64), (67, 45), (13, 100), (5, 7)])
def test_any_input_size_gives_same_size_logits(arch, h, w):
    model = build_model(arch).eval()
    logits, latent = model.forward_with_latent(torch.randn(2, 1, h, w))
    assert logits.shape == (2, 1, h, w)
    stride = model.stride
    assert latent.shape[-2:] == (-(-h // stride), -(-w // stride))


def test_latent_is_the_bottleneck_of_each_architecture():
    x = torch.randn(1, 1, 64, 64)
    assert build_model("fcrn").forward_with_latent(x)[1].shape == (1, 512, 8, 8)
    assert build_model("unet").forward_with_latent(x)[1].shape == (1, 128, 16, 16)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_affine_bn_conversion_keeps_the_function_exactly(arch):
    torch.manual_seed(0)
    model = build_model(arch)
    model.train()
    model(torch.randn(4, 1, 32, 32))  # move running statistics away from their defaults
    x = torch.randn(3, 1, 40, 40)
    for mode in ("eval", "train"):
        getattr(model, mode)()
        before = model(x).detach().clone()
        converted = make_bn_affine(build_model(arch))
        converted.load_state_dict(model.state_dict(), strict=False)
        getattr(converted, mode)()
        assert torch.equal(converted(x), before)
    make_bn_affine(model)
    assert is_bn_affine(model)
    n_bn = sum(m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert count_parameters(model) == count_parameters(build_model(arch)) + 2 * n_bn


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="resnet"):
        build_model("resnet")


def test_bad_input_shape_is_reported():
    with pytest.raises(ValueError, match=r"\(2, 3, 8, 8\)"):
        build_model("fcrn")(torch.zeros(2, 3, 8, 8))


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("arch", ["fcrn", "unet"])
def test_folded_batch_norm_computes_the_same_function(arch, affine):
    from fsmeta.models import fold_batch_norm

    torch.manual_seed(0)
    model = build_model(arch, affine=affine).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            if affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.3, 0.3)
    folded = fold_batch_norm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    x = torch.randn(2, 1, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
