"""The batch manifest's LoRA (examples/tiny-manifest.toml): the text-encoder modules of
tests/fixtures/lora_te_kohya.safetensors (kohya `lora_te1_` / `lora_te2_` keys, made by
make_lora_fixtures.py for the tiny text encoders), without its UNet keys, which fit unet_a and
not the tiny pipeline's UNet.

    python3 tools/make_batch_fixtures.py   ->  tests/fixtures/lora_te_only.safetensors
"""

from pathlib import Path

from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"

if __name__ == "__main__":
    source = load_file(str(ROOT / "lora_te_kohya.safetensors"))
    kept = {k: v for k, v in source.items() if k.startswith(("lora_te1_", "lora_te2_"))}
    assert kept, "lora_te_kohya.safetensors has no lora_te1_/lora_te2_ keys"
    save_file(kept, str(ROOT / "lora_te_only.safetensors"))
    print(f"lora_te_only.safetensors: {len(kept)} of {len(source)} tensors")
