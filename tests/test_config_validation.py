"""Bad settings fail at once with a one-line message that says what and how to fix (issues 13 and 14):
CGNSConfig values that would crash or silently stall training later, and the training script's own
arguments and tower sources."""
import math

import pytest

from cgns.pretraining.arguments import parse_args
from modeling_cgns import CGNSModel
from tiny import tiny_config

NAN = float("nan")


@pytest.mark.parametrize("name", [
    "local_text_temperature", "cluster_init_threshold", "hard_negative_weight", "bml_weight",
    "reconstruction_weight", "global_loss_weight", "local_image_loss_weight", "local_text_loss_weight",
    "logit_scale_max"])
def test_nan_float_fields_are_rejected(name):
    # each of these passed validation before: NaN fails no `<` comparison
    with pytest.raises(ValueError, match=rf"{name} must be a finite number, got nan"):
        tiny_config(**{name: NAN})


def test_infinite_loss_weight_is_rejected():
    with pytest.raises(ValueError, match="global_loss_weight must be a finite number, got inf"):
        tiny_config(global_loss_weight=math.inf)


@pytest.mark.parametrize("value", [True, False])
def test_bool_num_clusters_is_rejected(value):
    with pytest.raises(ValueError, match=rf"num_clusters must be a positive integer, got {value}"):
        tiny_config(num_clusters=value, cluster_queue_size=8)


def test_one_cluster_is_rejected():
    # the hard negative is the second-nearest centroid: K = 1 crashed at the first loss after initialisation
    with pytest.raises(ValueError, match="num_clusters must be >= 2"):
        tiny_config(num_clusters=1)


def test_two_clusters_and_finite_values_are_accepted():
    config = tiny_config(num_clusters=2, cluster_init_threshold=-0.5, local_text_temperature=0.07)
    assert config.num_clusters == 2 and config.cluster_queue_size == 4


def test_one_line_message_per_problem():
    with pytest.raises(ValueError) as error:
        tiny_config(local_text_temperature=NAN, bml_weight=NAN)
    lines = str(error.value).splitlines()
    assert lines[0] == "invalid CGNSConfig:"
    assert lines[1:] == ["  - local_text_temperature must be a finite number, got nan",
                         "  - bml_weight must be a finite number, got nan"]


@pytest.mark.parametrize("argv, message", [
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be >= 1, got 0"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be >= 1, got 0"),
    (["--nonfinite_grad", "ignore"], "nonfinite_grad must be skip or stop, got 'ignore'"),
    (["--learning_rate", "nan"], "--learning_rate must be a positive number, got nan"),
])
def test_bad_training_arguments_are_rejected(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_args(argv)


def test_unknown_vision_model_names_the_argument_not_a_timm_upgrade():
    with pytest.raises(ValueError) as error:
        CGNSModel.from_vision_text_pretrained("resnet999", "unused/text-model")
    message = str(error.value)
    assert "vision_model 'resnet999' is not a timm architecture name" in message
    assert "upgrade" not in message and "\n" not in message


@pytest.mark.parametrize("argument", ["vision_model", "text_model"])
def test_missing_local_tower_folder_says_so(tmp_path, argument):
    missing = str(tmp_path / "no_such_model")
    vision, text = (missing, "unused/text-model") if argument == "vision_model" else ("resnet18", missing)
    with pytest.raises(FileNotFoundError) as error:
        CGNSModel.from_vision_text_pretrained(vision, text)
    message = str(error.value)
    assert message.startswith(f"{argument} {missing!r}: no such folder")
    assert "Repo id must be" not in message and "\n" not in message
