"""transformers' generic ModelTesterMixin / ConfigTester tests against CGNS (the ``hf_common`` tier).

The pattern is transformers' own CLIP tests: a small "model tester" builds a tiny config and inputs,
and the mixin runs every generic test against ``all_model_classes``. CGNSModel runs with a ResNet
and a ViT image tower; CGNSForImageClassification (the frozen-tower probe) with a ResNet tower.
Every test that does not apply to CGNS is skipped below with its reason in one line.
"""
import copy
import unittest

import torch
from transformers import BertConfig, TimmWrapperConfig

from modeling_cgns import CGNSConfig, CGNSForImageClassification, CGNSModel
from transformers_tests.test_configuration_common import ConfigTester
from transformers_tests.test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor

# The reasons, once each (several tests share one).
NO_EMBEDDING_RESIZE = "CGNS is not a language model: its token embeddings are never resized"
NO_ATTENTIONS = "the timm image tower exposes no attention maps, so CGNS refuses output_attentions"
NO_INPUTS_EMBEDS = "CGNS takes pixel_values + input_ids + sentence_index; sentence pooling needs the token ids"
TIMM_ONLY_SDPA = "the timm image tower supports SDPA only (no flash/flex attention)"
TIMM_HIDDEN_STATES = ("the timm image tower's hidden states are its stages (forward_intermediates), not the "
                      "tester's num_hidden_layers + 1; tested in tests/test_pipelines.py")
BOOL_OUTPUTS = ("CGNSOutput carries bool masks (sentence_mask, token_mask) that the generic check subtracts; "
                "tuple/dict equivalence is tested in tests/test_huggingface.py")
COMPOSITE_HIDDEN = ("hidden states are the towers' own (vision_hidden_states / text_hidden_states), tested "
                    "in tests/test_huggingface.py; the generic test expects one hidden_states tuple")


class CGNSModelTester:
    """Tiny CGNS configs and inputs: hidden 32, 2 text layers, 2-block ViT or resnet18, 64 px."""

    def __init__(self, parent, architecture="resnet18", batch_size=3, seq_length=12, image_size=64,
                 is_training=True):
        self.parent = parent
        self.architecture = architecture
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.image_size = image_size
        self.num_channels = 3
        self.is_training = is_training
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 2
        self.vocab_size = 99
        self.text_config = self.get_text_config()

    def get_text_config(self) -> BertConfig:
        return BertConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                          num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                          intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)

    def get_vision_config(self) -> TimmWrapperConfig:
        # narrow towers: the generic tests want models under 1M parameters
        if self.architecture.startswith("vit"):
            model_args = {"img_size": self.image_size, "depth": 2, "embed_dim": 32, "num_heads": 2}
        else:
            model_args = {"channels": [8, 16, 32, 64], "stem_width": 8}
        return TimmWrapperConfig(architecture=self.architecture, model_args=model_args)

    def get_config(self) -> CGNSConfig:
        return CGNSConfig(vision_config=self.get_vision_config(), text_config=self.get_text_config(),
                          projection_dim=32, image_size=self.image_size, attention_pool_heads=4,
                          sentence_pool_heads=4, decoder_channels=[16, 8], decoder_layers=1, decoder_heads=4,
                          decoder_ffn_dim=32, num_clusters=4, max_text_length=self.seq_length)

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = torch.ones(self.batch_size, self.seq_length, dtype=torch.long)
        attention_mask[-1, -3:] = 0           # one padded report
        # sentences of 3 tokens after [CLS]; -1 on [CLS], the last token and padding
        sentence_index = torch.full((self.batch_size, self.seq_length), -1, dtype=torch.long)
        for row in range(self.batch_size):
            real = int(attention_mask[row].sum())
            positions = torch.arange(1, real - 1)
            sentence_index[row, 1:real - 1] = (positions - 1) // 3
        return self.get_config(), pixel_values, input_ids, attention_mask, sentence_index

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, input_ids, attention_mask, sentence_index = self.prepare_config_and_inputs()
        inputs = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask,
                  "sentence_index": sentence_index}
        return config, inputs


class CGNSCommonSkips:
    """Generic tests that do not apply to any CGNS model; each says why."""

    has_attentions = False
    test_resize_embeddings = False
    test_torch_exportable = False
    _is_composite = True

    @unittest.skip(reason=NO_INPUTS_EMBEDS)
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason=NO_INPUTS_EMBEDS)
    def test_inputs_embeds_matches_input_ids(self):
        pass

    @unittest.skip(reason=NO_EMBEDDING_RESIZE)
    def test_resize_embeddings_untied(self):
        pass

    @unittest.skip(reason=NO_EMBEDDING_RESIZE)
    def test_resize_tokens_embeddings(self):
        pass

    @unittest.skip(reason="CGNS has no single input embedding: get_input_embeddings is the towers' business")
    def test_model_get_set_embeddings(self):
        pass

    @unittest.skip(reason=COMPOSITE_HIDDEN)
    def test_hidden_states_output(self):
        pass

    @unittest.skip(reason=NO_ATTENTIONS)
    def test_retain_grad_hidden_states_attentions(self):
        pass

    @unittest.skip(reason=NO_ATTENTIONS)
    def test_capture_outputs_decorator(self):
        pass

    @unittest.skip(reason=BOOL_OUTPUTS)
    def test_model_outputs_equivalence(self):
        pass

    @unittest.skip(reason=TIMM_HIDDEN_STATES)
    def test_get_image_features_hidden_states(self):
        pass


class CGNSModelTest(CGNSCommonSkips, ModelTesterMixin, unittest.TestCase):
    all_model_classes = (CGNSModel,)
    architecture = "resnet18"
    # the ResNet tower's model_args name no width for the generic shape check (its feature map is B x C x h x w)
    skip_test_image_features_output_shape = True

    def setUp(self):
        self.model_tester = CGNSModelTester(self, architecture=self.architecture)
        # as CLIP's tests: scalar settings only, the towers are the config's defaults
        self.config_tester = ConfigTester(self, config_class=CGNSConfig, has_text_modality=False,
                                          projection_dim=32, num_clusters=4, sentence_pool_heads=4)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = CGNSModel(config).eval()
        with torch.no_grad():
            out = model(**inputs)
        b = self.model_tester.batch_size
        self.assertEqual(out.logits_per_image.shape, (b, b))
        self.assertEqual(out.image_embeds.shape, (b, 32))
        self.assertIs(out.to_tuple()[0], out.loss)


class CGNSModelViTTest(CGNSModelTest):
    architecture = "vit_tiny_patch16_224"
    skip_test_image_features_output_shape = False     # (B, 1 + P, embed_dim): checked


class CGNSClassificationModelTester(CGNSModelTester):
    num_labels = 3

    def get_config(self) -> CGNSConfig:
        config = super().get_config()
        config.num_labels = self.num_labels
        config.problem_type = "single_label_classification"
        return config

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, *_ = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}


class CGNSForImageClassificationTest(CGNSCommonSkips, ModelTesterMixin, unittest.TestCase):
    all_model_classes = (CGNSForImageClassification,)
    # The probe's tower is frozen: only the head trains, so not every parameter gets a gradient.
    test_all_params_have_gradient = False

    def setUp(self):
        self.model_tester = CGNSClassificationModelTester(self)

    @unittest.skip(reason="a frozen-tower head loads from a CGNS export folder/id (config checked first), not from a "
                          "bare state_dict with no checkpoint")
    def test_from_pretrained_no_checkpoint(self):
        pass

    @unittest.skip(reason="by design a checkpoint missing image-tower weights is refused, not re-initialised "
                          "(tests/test_classification.py)")
    def test_model_weights_reload_no_missing_tied_weights(self):
        pass

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs = copy.deepcopy(inputs_dict)
        if return_labels:
            inputs["labels"] = torch.zeros(self.model_tester.batch_size, dtype=torch.long)
        return inputs

    def test_model(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = CGNSForImageClassification(config).eval()
        labels = torch.tensor([0, 1, 2])
        out = model(**inputs, labels=labels)
        self.assertEqual(out.logits.shape, (3, 3))
        self.assertIs(out.to_tuple()[0], out.loss)
