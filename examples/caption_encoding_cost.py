"""What shuffled captions cost per step: encoding a batch with an SD 1.x-sized CLIP text encoder (random weights,
ViT-L/14 text config) versus gathering cached variant embeddings. Prints milliseconds per batch of 4."""
import time

import torch
from transformers import CLIPTextConfig, CLIPTextModel

torch.manual_seed(0)
encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                       num_hidden_layers=12, max_position_embeddings=77)).eval()
ids = torch.randint(0, 49408, (4, 77))
cache = torch.randn(16 * 100, 77, 768)  # 16 cached variants of 100 images
with torch.no_grad():
    encoder(ids)  # warm-up
    start = time.perf_counter()
    for _ in range(5):
        encoder(ids)
    encode_ms = (time.perf_counter() - start) / 5 * 1e3
start = time.perf_counter()
for _ in range(100):
    torch.stack([cache[i] for i in torch.randint(0, cache.shape[0], (4,)).tolist()])
gather_ms = (time.perf_counter() - start) / 100 * 1e3
print(f"encode 4 captions: {encode_ms:.1f} ms; gather 4 cached variants: {gather_ms:.3f} ms")
