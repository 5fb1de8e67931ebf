"""Tiny in-code CGNS configurations shared by the tests (hidden 32, 1-2 layers, 64 px)."""
import torch
from transformers import BertConfig, TimmWrapperConfig

from modeling_cgns import CGNSConfig


# the authors' clustering (CGNSConfig.REFERENCE_SETTINGS), for tests that pin the reference behaviour now that
# CGNSConfig's defaults cluster the text features (docs/clustering.md)
REFERENCE_CLUSTERING = dict(cluster_features="cross", cluster_update="momentum", cluster_count_decay=1.0,
                            false_negative_handling="bml", dead_cluster_patience=0)


def tiny_config(arch: str = "resnet18", image_size: int = 64, **overrides) -> CGNSConfig:
    model_args = {"img_size": image_size} if arch.startswith(("vit", "deit")) else None
    kwargs = dict(
        vision_config=TimmWrapperConfig(architecture=arch, model_args=model_args),
        text_config=BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64),
        projection_dim=32, image_size=image_size, attention_pool_heads=4, sentence_pool_heads=4,
        decoder_channels=[16, 8], decoder_layers=2, decoder_heads=4, decoder_ffn_dim=32, num_clusters=4,
        max_text_length=48,
    )
    kwargs.update(overrides)
    return CGNSConfig(**kwargs)


def tiny_batch(batch: int = 3, length: int = 20, image_size: int = 64, seed: int = 0, vocab: int = 120):
    """Random inputs with ragged sentence counts (1-4 sentences per report, one with padding)."""
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, image_size, image_size, generator=g)
    input_ids = torch.randint(5, vocab, (batch, length), generator=g)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    sentence_index = torch.full((batch, length), -1, dtype=torch.long)
    for b in range(batch):
        n_sent = 1 + (b * 3 + seed) % 4
        real = length - 2 * (b % 3)
        attention_mask[b, real:] = 0
        pos = 1
        for s in range(n_sent):
            span = 1 + int(torch.randint(1, 4, (1,), generator=g))
            end = min(pos + span, real - 1)
            sentence_index[b, pos:end] = s
            pos = end
    return dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                sentence_index=sentence_index)


__all__ = ["tiny_config", "tiny_batch", "REFERENCE_CLUSTERING"]
