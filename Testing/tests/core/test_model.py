"""DualEncoderUNet: shapes in 2D and 3D, fusion, deep supervision, freezing."""

import pytest
import torch

from relsegcore.models import DualEncoderUNet, NetworkConfig, count_parameters


@pytest.mark.parametrize("dims, shape", [(2, (2, 1, 64, 48)), (3, (1, 1, 16, 32, 32))])
@pytest.mark.parametrize("general", [True, False])
def test_output_shape_matches_input(dims, shape, general):
    network = DualEncoderUNet(dims=dims, depth=4, base_channels=4, num_classes=3, use_general_encoder=general)
    logits = network(torch.randn(shape))
    assert logits.shape == (shape[0], 3, *shape[2:])


def test_plain_unet_is_the_dual_network_without_general_encoder():
    plain = DualEncoderUNet(use_general_encoder=False)
    dual = DualEncoderUNet()
    assert plain.general_encoder is None
    # The default plain network is the 1.9 M-parameter 2D U-Net of the reference.
    assert 1.8e6 < count_parameters(plain) < 2.0e6
    # The dual network adds a whole encoder and wider decoder inputs.
    assert count_parameters(dual) > count_parameters(plain) + count_parameters(plain.target_encoder)


def test_features_of_both_encoders_are_returned_per_level():
    network = DualEncoderUNet(depth=4, base_channels=4)
    _, features = network(torch.randn(3, 1, 32, 32), return_features=True)
    assert [f.shape[1] for f in features["general"]] == [4, 8, 16, 32]
    assert [f.shape[-1] for f in features["target"]] == [32, 16, 8, 4]


def test_fusion_levels_change_only_the_decoder_inputs():
    all_levels = DualEncoderUNet(depth=4, base_channels=4)
    bottleneck_only = DualEncoderUNet(depth=4, base_channels=4, fusion_levels=[3])
    assert count_parameters(bottleneck_only) < count_parameters(all_levels)
    assert bottleneck_only(torch.randn(1, 1, 32, 32)).shape == (1, 2, 32, 32)


def test_general_features_reach_the_output():
    torch.manual_seed(0)
    network = DualEncoderUNet(depth=3, base_channels=4).eval()
    x = torch.randn(1, 1, 16, 16)
    before = network(x)
    with torch.no_grad():
        for p in network.general_encoder.parameters():
            p.add_(0.5)
    assert not torch.allclose(before, network(x))


def test_deep_supervision_returns_coarser_outputs_in_training_only():
    network = DualEncoderUNet(depth=4, base_channels=4, deep_supervision=True)
    outputs = network.train()(torch.randn(2, 1, 32, 32))
    assert [o.shape[-1] for o in outputs] == [32, 16, 8]
    assert network.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 2, 32, 32)


def test_freezing_the_general_encoder_stops_its_gradients():
    network = DualEncoderUNet(depth=3, base_channels=4)
    network.freeze_general_encoder()
    network(torch.randn(2, 1, 16, 16)).sum().backward()
    assert all(p.grad is None for p in network.general_encoder.parameters())
    assert all(p.grad is not None for p in network.target_encoder.parameters())


def test_config_round_trips_through_a_dict():
    config = NetworkConfig(dims=3, depth=4, fusion_levels=[2, 3], num_classes=3)
    assert NetworkConfig(**config.to_dict()) == config
