"""Text conditioning: the frozen encoders Stages B and C read (``encoder``) and the tiny CLIP trained here
(``clip``: model, contrastive training, retrieval and twin evaluation, save and load)."""
from __future__ import annotations

from .clip import (CLIP_TRAINING, TINY_CLIP_SIZES, ClipTraining, MissingTextEncoder, TinyClipConfig, add_twins,
                   create_tiny_clip, encode_pairs, filip_loss, load_text_encoder, load_tiny_clip,
                   load_tiny_text_encoder, plot_similarity, register_tiny_clip, retrieval_metrics, save_tiny_clip,
                   text_encoder_dir, train_and_save_tiny_clip, train_tiny_clip, twin_accuracy)
from .encoder import (CONTEXT_LENGTH, EOT_ID, LAYERS, SOT_ID, TEXT_KEYS, HFCLIPTextEncoder, Layer, TextEncoder,
                      TextOutput, char_tokenizer, hf_tokenizer, to_hf, tokenize)
