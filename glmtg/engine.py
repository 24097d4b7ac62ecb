"""The engine: owns the KV cache, runs chunked prefill and the (CUDA-graph) decode step, samples.

One ``Engine`` holds a static KV cache of ``ctx_size`` tokens for ``batch`` sequences. ``prefill``
runs a prompt through the model ``ubatch`` tokens at a time; ``decode_step`` runs one token per
sequence, advances ``cache.lengths`` and samples the next token, all on the device. On CUDA that
step is captured once in a CUDA graph over static buffers (token in/out, cache, sampler state) and
replayed: the step reads its input token from the same buffer it writes its output to, so steps
chain on the GPU without the host looking at a token.

The engine keeps a host copy of each sequence's length (it made every change to it), so the
context checks never read ``cache.lengths`` back from the device.

The engine is library code: it never prints. Errors name its parameters (``ctx_size``, ``k_format``);
progress goes to a callback the caller passes; a decode graph that cannot be captured is a
``RuntimeWarning`` naming the cause before the engine decodes eagerly.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from glmtg.cpu.host_experts import host_expert_layers
from glmtg.cpu.host_node import node_available
from glmtg.layers.attention import BACKENDS
from glmtg.config import ModelConfig
from glmtg.formats import KV_FORMATS
from glmtg.graph_capture import capture_graph
from glmtg.kv_cache import KVCache
from glmtg.memory import check_fits
from glmtg.sampling import GREEDY, Sampler, SamplingParams

# (tokens done, tokens in all) after each prefill chunk has finished on the device
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class EngineConfig:
    """Sizes and formats of one engine; checked once here so bad values fail before any work."""

    ctx_size: int = 4096
    ubatch: int = 512
    batch: int = 1
    k_format: str = "bf16"
    v_format: str | None = None  # None: same as k_format
    attn_backend: str = "glmtg"
    # Prefill chunks may use another backend (None: attn_backend): "eager" prefill materialises
    # [heads, ub, N_KV] fp32 scores, tens of GB at long context, which a decode comparison need not pay.
    prefill_backend: str | None = None
    use_cuda_graph: bool | None = None  # None: capture the decode step when the device is CUDA

    def __post_init__(self) -> None:
        for name in ("ctx_size", "ubatch", "batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.v_format is None:
            object.__setattr__(self, "v_format", self.k_format)
        for name in ("k_format", "v_format"):
            if getattr(self, name) not in KV_FORMATS:
                raise ValueError(f"{name} must be one of {', '.join(KV_FORMATS)}, got {getattr(self, name)!r}")
        if self.prefill_backend is None:
            object.__setattr__(self, "prefill_backend", self.attn_backend)
        for name in ("attn_backend", "prefill_backend"):
            if getattr(self, name) not in BACKENDS:
                raise ValueError(f"{name} must be one of {', '.join(BACKENDS)}, got {getattr(self, name)!r}")
        if self.use_cuda_graph is not None and not isinstance(self.use_cuda_graph, bool):
            raise ValueError(f"use_cuda_graph must be None, True or False, got {self.use_cuda_graph!r}")


@dataclass
class GenerationResult:
    """What ``Engine.generate`` produced, with the timings the CLI reports."""

    tokens: list[int]
    prompt_tokens: int
    prompt_seconds: float  # prefill + first token
    decode_seconds: float  # every later token (one decode step each)
    stop_reason: str  # "eos" or "length"
    seed: int = 0
    decode_steps: int = field(default=0)

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else float("nan")

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def default_ubatch(device: torch.device | str, ctx_size: int) -> int:
    """The prefill chunk (ubatch) for ``device`` when none is asked for, never above ``ctx_size``: 4096 tokens
    on a GPU of 100 or more SMs (H100/H200), 2048 on smaller GPUs, 512 on a CPU.

    Why: the prefill GEMMs fill a Hopper GPU's tensor cores only at thousands of rows, the routed experts'
    grouped GEMM most of all (each expert sees T·k/E rows); numbers in bench/DECISIONS.md H7. The CPU keeps
    llama.cpp's 512 (memory, not throughput, bounds it)."""
    device = torch.device(device)
    if device.type != "cuda":
        return min(512, ctx_size)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return min(4096 if sms >= 100 else 2048, ctx_size)


def kv_cache_bytes(config: ModelConfig, ctx_size: int, batch: int, k_format: str, v_format: str) -> int:
    """Bytes a contiguous cache of this size takes (measured on a 1-token cache, so scales count)."""
    probe = KVCache(num_layers=1, batch=1, capacity=1, num_kv_heads=config.num_key_value_heads,
                    head_dim=config.head_dim, k_format=k_format, v_format=v_format, device="meta")
    return probe.bytes_per_token * config.num_hidden_layers * ctx_size * batch


def kv_cache_hint() -> str:
    """What to change when a KV cache does not fit (parameter names; the CLI shows them as its flags)."""
    return "lower ctx_size or use a smaller cache format (k_format/v_format q8_0, q4_0)"


def check_kv_fits(config: ModelConfig, settings: EngineConfig, device: torch.device | str) -> None:
    """Raise ValueError (GB needed vs available) when the KV cache of ``settings`` cannot fit on ``device``."""
    s = settings
    need = kv_cache_bytes(config, s.ctx_size, s.batch, s.k_format, s.v_format)
    check_fits(f"the KV cache for ctx_size {s.ctx_size} (batch {s.batch}, k_format {s.k_format}, "
               f"v_format {s.v_format})", need, device, kv_cache_hint())


def decode_graph_blocker(model: torch.nn.Module) -> str | None:
    """Why ``model``'s decode step must run eagerly (a one-line notice), or None when it can be captured.

    Host-placed routed experts (glmtg.cpu.host_experts) are captured as CUDA host nodes (glmtg.cpu.host_node)
    where this process can launch them (a CUDA runtime or driver library and the compiled CPU kernel);
    without that they copy to the host and call the kernel from Python, which a CUDA graph cannot replay."""
    layers = host_expert_layers(model)
    if not layers or node_available():
        return None
    return (f"CUDA-graph decode is off: the routed experts of {len(layers)} layer(s) run on the CPU without "
            f"CUDA host nodes here (no CUDA runtime library or no compiled CPU kernel)")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Engine:
    """Inference over one model: static KV cache, chunked prefill, graph-captured decode, sampling.

    ``config`` is the model's ``ModelConfig``, ``settings`` the engine's sizes and formats. ``device``
    defaults to the model's. A KV cache larger than the device's available memory is refused
    (ValueError) before it is allocated.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: ModelConfig,
        settings: EngineConfig | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        settings = EngineConfig() if settings is None else settings
        if not isinstance(settings, EngineConfig):
            raise ValueError(f"settings must be an EngineConfig, got {type(settings).__name__}")
        if device is None:
            device = next(model.parameters()).device
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if settings.use_cuda_graph is None:
            settings = dataclasses.replace(settings, use_cuda_graph=self.device.type == "cuda")
        blocker = decode_graph_blocker(model)
        if settings.use_cuda_graph and blocker is not None:
            warnings.warn(blocker, stacklevel=2)
            settings = dataclasses.replace(settings, use_cuda_graph=False)
        if settings.use_cuda_graph and self.device.type != "cuda":
            raise ValueError(f"use_cuda_graph needs a CUDA device, not {self.device}")
        self.settings = settings
        self.model = model
        self.config = config
        s = self.settings
        if s.ctx_size > config.max_position_embeddings:
            warnings.warn(f"ctx_size {s.ctx_size} exceeds the model's max_position_embeddings "
                          f"({config.max_position_embeddings}); positions beyond it are untrained", stacklevel=2)
        check_kv_fits(config, s, self.device)
        self.cache = KVCache(num_layers=config.num_hidden_layers, batch=s.batch, capacity=s.ctx_size,
                             num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
                             k_format=s.k_format, v_format=s.v_format, device=self.device)
        self.sampler = Sampler(s.batch, self.device)
        self.sampler.set_params(GREEDY)
        self._lengths = [0] * s.batch  # host mirror of cache.lengths
        # The decode step's static token buffer: input of a step, then overwritten by its output.
        self._token = torch.zeros(s.batch, dtype=torch.long, device=self.device)
        self._graphs: dict[int | None, torch.cuda.CUDAGraph] = {}
        self._graph_pool = None
        self._graph_failed = False

    # ---------------------------------------------------------------- properties

    @property
    def lengths(self) -> list[int]:
        """Cached tokens per sequence (host copy, no device read)."""
        return list(self._lengths)

    @property
    def uses_cuda_graph(self) -> bool:
        return self.settings.use_cuda_graph and not self._graph_failed

    # ---------------------------------------------------------------- checks

    def _check_room(self, new_tokens: int, what: str) -> None:
        longest = max(self._lengths)
        if longest + new_tokens > self.settings.ctx_size:
            raise ValueError(f"{what}: {longest} cached + {new_tokens} new tokens exceed ctx_size {self.settings.ctx_size}")

    # ---------------------------------------------------------------- cache

    def reset(self) -> None:
        """Empty the cache (all sequences)."""
        self.truncate(0)

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` tokens of every sequence and drop the rest (only lengths change)."""
        if not isinstance(length, int) or not 0 <= length <= min(self._lengths):
            raise ValueError(f"truncate length must be an int in [0, {min(self._lengths)}], got {length!r}")
        self.cache.lengths.fill_(length)
        self._lengths = [length] * self.settings.batch

    # ---------------------------------------------------------------- prefill

    def _as_batch(self, token_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]]) -> torch.Tensor:
        ids = token_ids if isinstance(token_ids, torch.Tensor) else torch.tensor(token_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None, :].expand(self.settings.batch, -1)
        if ids.dim() != 2 or ids.shape[0] != self.settings.batch:
            raise ValueError(f"token ids must be [S] or [B={self.settings.batch}, S], got shape {tuple(ids.shape)}")
        return ids.to(device=self.device, dtype=torch.long)

    @torch.no_grad()
    def prefill(
        self,
        token_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
        *,
        on_logits: Callable[[int, torch.Tensor], None] | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> torch.Tensor:
        """Append tokens to the cache, ``ubatch`` at a time; returns the last token's logits, fp32 [B, V].

        ``token_ids``: [S] (same tokens for every sequence) or [B, S]. ``on_logits(start, logits)``,
        when given, receives each chunk's full logits [B, s, V] (start = offset of the chunk in
        ``token_ids``); without it only the last position goes through the lm_head.
        ``on_progress(done, total)``, when given, is called after each chunk once the device has
        finished it (one synchronisation per chunk: pass it only where progress is shown).
        """
        ids = self._as_batch(token_ids)
        total = ids.shape[1]
        if total == 0:
            raise ValueError("prefill needs at least one token")
        self._check_room(total, "prefill")
        logits = None
        for start in range(0, total, self.settings.ubatch):
            chunk = ids[:, start:start + self.settings.ubatch]
            n = chunk.shape[1]
            out = self.model(chunk, self.cache, attn_backend=self.settings.prefill_backend,
                             last_only=on_logits is None, validate=False)  # room checked on the host copy
            self.cache.lengths += n
            self._lengths = [length + n for length in self._lengths]
            if on_logits is not None:
                on_logits(start, out)
            logits = out
            if on_progress is not None:
                _synchronize(self.device)  # so progress reports finished work, not queued launches
                on_progress(start + n, total)
        return logits[:, -1]

    # ---------------------------------------------------------------- decode

    def _step(self) -> None:
        """One decode step on the static buffers: forward, advance lengths, sample into ``_token``."""
        # The engine checked the room on its host copy of the lengths: the model need not read them back.
        logits = self.model(self._token[:, None], self.cache, attn_backend=self.settings.attn_backend,
                            validate=False)  # [B, 1, V]
        self.cache.lengths += 1
        self._token.copy_(self.sampler(logits[:, -1]))

    def _capture(self, key: int | None) -> torch.cuda.CUDAGraph:
        # Warm-up runs execute for real: they write K/V at the current position (overwritten by the
        # first real step) and advance lengths and the sampler's step, so all three are restored.
        saved = (self.cache.lengths.clone(), self.sampler.step.clone(), self._token.clone())

        def restore() -> None:
            self.cache.lengths.copy_(saved[0])
            self.sampler.step.copy_(saved[1])
            self._token.copy_(saved[2])

        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        return capture_graph(self._step, self.device, self._graph_pool, restore)

    @torch.no_grad()
    def decode_step(self, token: torch.Tensor | Sequence[int] | int | None = None) -> torch.Tensor:
        """Run one token per sequence and sample the next; returns the static token buffer int64 [B].

        ``token`` None feeds the previous step's output (the GPU chains steps on its own); otherwise
        it is copied in first (a device tensor is copied without a sync). The returned tensor is
        overwritten by the next step: clone it or read it before then.
        """
        self._check_room(1, "decode")
        if token is not None:
            if isinstance(token, int):
                token = [token] * self.settings.batch
            t = token if isinstance(token, torch.Tensor) else torch.tensor(token, dtype=torch.long)
            self._token.copy_(t.reshape(self.settings.batch))
        graph = self._graph() if self.uses_cuda_graph else None
        if graph is not None:
            graph.replay()
        else:
            self._step()
        self._lengths = [length + 1 for length in self._lengths]
        return self._token

    def _graph(self) -> torch.cuda.CUDAGraph | None:
        """The decode graph of the sampler's current mode, captured on first use.

        A capture that fails (e.g. a path that reads a device value on the host) turns graphs off for
        this engine with a RuntimeWarning naming the cause: decoding goes on eagerly, never silently.
        """
        key = self.sampler.mode(self.config.vocab_size)
        graph = self._graphs.get(key)
        if graph is None:
            try:
                graph = self._graphs[key] = self._capture(key)
            except Exception as e:  # noqa: BLE001 - any capture failure: warn, then decode eagerly
                self._graph_failed = True
                _synchronize(self.device)
                warnings.warn(f"CUDA graph capture of the decode step failed ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:300]}); decoding eagerly from now on",
                              RuntimeWarning, stacklevel=3)
                return None
        return graph

    def synchronize(self) -> None:
        _synchronize(self.device)

    # ---------------------------------------------------------------- whole requests

    @torch.no_grad()
    def warmup(self, sampling: SamplingParams = GREEDY, prefill_tokens: int = 16, decode_steps: int = 2) -> None:
        """Compile/capture outside any timing: a short prefill and a few decode steps, then an empty cache.

        Pass the sampling params the timed run will use: the decode graph is captured per sampler mode.
        """
        n = max(1, min(prefill_tokens, self.settings.ctx_size - decode_steps))
        self.reset()
        self.sampler.set_params(sampling)
        gen = torch.Generator().manual_seed(0)
        self.prefill(torch.randint(0, self.config.vocab_size, (n,), generator=gen))
        for _ in range(min(decode_steps, self.settings.ctx_size - n)):
            self.decode_step()
        self.synchronize()
        self.reset()

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Sequence[int],
        n: int,
        sampling: SamplingParams = GREEDY,
        *,
        stop_on_eos: bool = True,
        eos_token_ids: Sequence[int] | None = None,
        on_token: Callable[[int], None] | None = None,
        on_prefill_progress: ProgressCallback | None = None,
    ) -> GenerationResult:
        """Generate up to ``n`` tokens after ``prompt_ids`` (one sequence, from an empty cache).

        ``n < 0`` means until EOS or a full context. ``on_token`` is called with each token as soon
        as it is known (streaming). The one host sync per token is that read: the step itself has none.
        ``on_prefill_progress`` is passed to ``prefill`` for the prompt.
        """
        if self.settings.batch != 1:
            raise ValueError(f"generate runs one sequence; this engine has batch {self.settings.batch}")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
        if n < 0:
            n = self.settings.ctx_size - len(prompt)
        if len(prompt) + n > self.settings.ctx_size:
            raise ValueError(f"prompt ({len(prompt)} tokens) + {n} new tokens exceed ctx_size {self.settings.ctx_size}")
        eos = set(self.config.eos_token_ids if eos_token_ids is None else eos_token_ids) if stop_on_eos else set()

        self.reset()
        seed = self.sampler.set_params(sampling)[0]
        t0 = time.perf_counter()
        last_logits = self.prefill(prompt, on_progress=on_prefill_progress)
        tokens: list[int] = []
        stop = "length"
        t1 = t0
        steps = 0
        if n > 0:
            self._token.copy_(self.sampler(last_logits))
            for i in range(n):
                token = int(self._token[0])  # the host read streaming needs
                if i == 0:
                    t1 = time.perf_counter()
                tokens.append(token)
                if on_token is not None:
                    on_token(token)
                if token in eos:
                    stop = "eos"
                    break
                if i + 1 < n:
                    self.decode_step()
                    steps += 1
        self.synchronize()
        t2 = time.perf_counter()
        if n == 0:
            t1 = t2
        return GenerationResult(tokens=tokens, prompt_tokens=len(prompt), prompt_seconds=t1 - t0,
                                decode_seconds=t2 - t1, stop_reason=stop, seed=seed, decode_steps=steps)
