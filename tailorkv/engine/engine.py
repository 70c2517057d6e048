"""Engine: the offline, SGLang-style API. `Engine(...).generate(prompt | input_ids, sampling_params)`."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import replace

import torch

from ..config import EngineConfig
from ..errors import InvalidRequestError
from ..kernels.dispatch import sm_count
from ..kvcache.budget import TARGET
from ..kvcache.plans import save_plan
from ..memory.host_memory import to_device
from ..memory.pages import MemoryManager
from ..models.loader import resolve
from ..models.sharding import check_divisible
from ..scheduler.scheduler import Scheduler, Seq, Step
from ..scheduler.step_cost import CPU_CHUNK, CUDA_CHUNK, STEP_BUDGET_MS, StepCost
from .calibration import Calibration, prompt_ids
from .engine_rank import EngineRank, pick_device
from .grammar import Grammars
from .logits_processors import processors_for
from .overlap import InFlight, input_ids, overlappable
from .request import Request, RequestOptions
from .runner import PromptScore
from .sampling import SamplingParams, check_text, draw, sample
from .step_log import StepLog
from .tokenizer import Tokenizer
from .tp_workers import Workers, rank_device

log = logging.getLogger("tailorkv.engine")
MAX_CHARS_PER_TOKEN = 256  # longer than any token of common vocabularies (the embedded one: 81)


def describe(s: dict) -> str:
    """One log line of TailorKV settings (TailorPolicy.settings)."""
    ks = ", ".join(f"{layer}: {k}" for layer, k in s["top_k"].items())
    return (
        f"TailorKV {s['preset']}: Q layers {s['quant_layers']} ({s['quant_layers_source']}) at "
        f"{s['quant_bits']} bits; S layers: key sketch {s['key_sketch']} bits, d_s {s['d_s']}, sink {s['sink']} + "
        f"recent {s['recent']} + top_k at {s['context']} tokens {{{ks}}} (mean budget "
        f"{s['mean_budget']:.0f}; {s['budget_source']})"
    )


class Engine:
    def __init__(
        self, model: str | None = None, kv_policy: str = "full", device=None, dtype=None, **options
    ):
        """Every setting of EngineConfig by name; any other keyword is an option of the KV policy."""
        self._start(EngineConfig.from_kwargs(model, kv_policy, device, dtype, **options))

    @classmethod
    def from_config(cls, config: EngineConfig) -> Engine:
        engine = cls.__new__(cls)
        engine._start(config)
        return engine

    def _start(self, config: EngineConfig) -> None:
        device = pick_device(rank_device(config, 0))
        cuda = device.type == "cuda"
        if config.chunked_prefill_size is None:
            config = replace(config, chunked_prefill_size=CUDA_CHUNK if cuda else CPU_CHUNK)
        if config.overlap_schedule is None:
            config = replace(config, overlap_schedule=cuda and config.tp_size == 1)
        if config.enable_torch_compile is None:
            config = replace(config, enable_torch_compile=cuda)
        self.options, self.kv_policy = config, config.kv_policy
        if config.tp_size > 1:  # before any process starts
            check_divisible(resolve(config.model, device).config, config.tp_size)
        self.workers = Workers(config, device) if config.tp_size > 1 else None
        try:
            rank = EngineRank(config, device, self.workers and self.workers.group)
            self.device, self.dtype, self.model = rank.device, rank.dtype, rank.model
            self.config = rank.config
            self.tokenizer = Tokenizer(rank.tokenizer_source, extra_eos=self.config.eos_token_ids)
            self.grammars = Grammars(self.tokenizer, self.config.vocab_size)
            self._rank = rank
            policy = rank.policy
            if getattr(policy, "plan_missing", False) or getattr(policy, "budget_missing", False):
                # a model without a shipped or cached plan: calibrate once (every rank), cache
                keep = None if policy.plan_missing else policy.tc.quant_layers
                self.calibrate(keep_quant_layers=keep)
            if self.workers:  # every rank runs rank 0's plans, then builds its caches
                if hasattr(policy, "plans"):
                    self.workers.group.broadcast(("rank", "adopt", (policy.plans(),), {}))
                self.workers.group.broadcast(None)
            # the TailorKV settings in force at a context (None for other policies), as logged now
            self.kv_settings = getattr(policy, "settings", None)
            if self.kv_settings:
                log.info(describe(self.kv_settings(self.config.max_position)))
            layout = rank.build_cache()
        except BaseException:
            if self.workers:
                self.workers.kill()
            raise
        self.policy, self.runner = rank.policy, rank.runner
        if self.workers:
            self.policy, self.runner = self.workers.wrap(self.policy, self.runner)
        self.memory = MemoryManager(layout.pools, prefix=layout.prefix_blocks)
        longest = layout.max_prompt(1)
        if longest < self.config.max_position - 1:
            log.warning(
                "this engine's KV pools hold prompts of at most %d tokens, of the model's %d: --kv-cache-gib "
                "(GPU) or --host-kv-gib (host tier) raises that",
                longest,
                self.config.max_position,
            )
        self.scheduler = Scheduler(
            self.memory,
            layout,
            max_running=self.options.max_running_requests,
            max_queued=self.options.max_queued_requests,
            chunk_tokens=self.options.chunked_prefill_size,
            reserve_output=self.options.reserve_output_tokens,
            max_passes=self.options.max_passes,
            cost=self._step_cost(),
        )
        self.requests: dict[int, Request] = {}
        self._ids = itertools.count()
        # sampled requests without a seed: one draw per step for all of them
        self._generator = torch.Generator(self.device).manual_seed(self.options.seed)
        # add/abort may come from another thread than the one running step()
        self._lock = threading.Lock()
        self.step_log = StepLog()
        self._inflight: InFlight | None = None  # the overlap schedule's launched step
        self._landed_at = 0.0  # when the last step's tokens were handed out
        self.step_log.alloc_retries = self._allocator_retries()  # those while loading are no step's

    def _step_cost(self) -> StepCost | None:
        ms = self.options.step_budget_ms
        if ms is None:
            ms = STEP_BUDGET_MS if self.device.type == "cuda" else 0.0
        if not ms:
            return None
        return StepCost.for_model(
            self.config, ms / 1e3, sm_count(self.device), self.options.tp_size
        )

    # ---- requests -------------------------------------------------------------------------------------------
    def tokenize(self, prompt: str | None, input_ids: list[int] | None) -> list[int]:
        if input_ids is not None:
            if not isinstance(input_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in input_ids
            ):
                raise InvalidRequestError("input_ids must be a list of integers")
            bad = [t for t in input_ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})"
                )
            ids = input_ids
        elif isinstance(prompt, str):
            # refused before tokenizing (seconds of CPU for megabytes): it cannot fit the context
            limit = self.config.max_position * MAX_CHARS_PER_TOKEN
            if len(prompt) > limit:
                raise InvalidRequestError(
                    f"the prompt has {len(prompt)} characters; the model's context of "
                    f"{self.config.max_position} tokens holds at most {limit}"
                )
            check_text(prompt, "the prompt")
            ids = self.tokenizer.encode(prompt)
        else:
            raise InvalidRequestError("give a prompt string or input_ids")
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        return ids

    def max_output(self, prompt_len: int) -> int:
        """The most answer tokens a prompt of `prompt_len` tokens can have: up to the end of the context or of
        the KV memory, whichever comes first (a chat request without max_tokens runs until then)."""
        return max(
            min(self.config.max_position - prompt_len, self.scheduler.max_output(prompt_len)), 1
        )

    def add_request(
        self, input_ids: list[int], params: SamplingParams, options: RequestOptions | None = None
    ) -> Request:
        """Validate and queue a request; raises InvalidRequestError / CapacityError without side effects."""
        o = options or RequestOptions()
        bad = [t for t in params.logit_bias or () if not 0 <= t < self.config.vocab_size]
        if bad:
            raise InvalidRequestError(f"logit_bias token id {bad[0]} is outside the vocabulary")
        total = len(input_ids) + params.max_new_tokens
        if total > self.config.max_position:
            raise InvalidRequestError(
                f"prompt ({len(input_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} exceeds "
                f"the model's context of {self.config.max_position} tokens"
            )
        # compiled already on the server's path (AsyncEngine.compile_grammars), now offline
        grammar = self.grammars.matcher(*params.grammar) if params.grammar else None
        with self._lock:
            rid = next(self._ids)
            gen = None
            if not params.greedy and params.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(params.seed)
            seq = Seq(rid, len(input_ids), params.max_new_tokens)
            seq.after = o.prefill_after
            if o.logprob_start is not None:  # the logits before the first scored token are computed
                seq.cache_limit = max(o.logprob_start - 1, 0)
            req = Request(rid, list(input_ids), params, seq, gen)
            req.use(o)
            req.logits_processors += processors_for(
                params, req.input_ids, req.output_ids, self.tokenizer.eos_token_ids
            )
            if grammar is not None:
                req.grammar = grammar
                req.logits_processors.append(grammar)
            self.scheduler.add(req.seq, req.input_ids)
            self.requests[rid] = req
        return req

    def abort(self, rid: int, message: str = "aborted") -> None:
        """Finish the request and free its pages at once: call it from the thread that runs step(), between
        steps (AsyncEngine queues aborts from other threads for that reason)."""
        with self._lock:
            req = self.requests.pop(rid, None)
            if req is not None and not req.finished:
                req.abort(message)
            self.scheduler.finish(rid)
            self.policy.release(rid)

    def flush_cache(self) -> int:
        """Drop the prefix cache's blocks that no request references; returns how many (0 without a cache). Call it
        between steps, from the thread that runs step()."""
        with self._lock:
            return self.memory.prefix.flush() if self.memory.prefix else 0

    # ---- the loop -------------------------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        """Requests to run, or a step in flight to land."""
        return self.scheduler.has_work or self._inflight is not None

    def step(self, admit: bool = True) -> list[Request]:
        """Run one scheduled batch; returns the requests that received a token (finished ones are retired): with the
        overlap schedule, those of the step launched before, whose tokens land now. `admit=False`: no waiting
        request joins in this step."""
        began, landed = time.perf_counter(), []
        if self._inflight is not None and not self.scheduler.can_grow():
            landed = self._land()  # a retracted request prefills all its tokens
        with self._lock:
            plan = self._schedule(admit)
            reqs = [self.requests[s.rid] for s in plan.seqs] if plan else []
        if not reqs:
            return landed + self._land()
        if self.options.overlap_schedule and overlappable(plan, reqs):
            logits = self._launch(plan, reqs)
            landed += self._land()
            # sampled after the landing: processors see every token; rows that ended are left out
            live = [i for i, r in enumerate(reqs) if not r.finished]
            if live:
                if len(live) < len(reqs):
                    logits = logits.index_select(0, to_device(torch.tensor(live), self.device))
                self._inflight = self._draw([reqs[i] for i in live], logits)
            return landed
        if self._inflight is not None:
            landed += self._land()
            began = time.perf_counter()
        # the rows that ended in the step landed now are left out
        keep = [i for i, r in enumerate(reqs) if not r.finished]
        plan.seqs, plan.new = [plan.seqs[i] for i in keep], [plan.new[i] for i in keep]
        return landed + (self._run(plan, [reqs[i] for i in keep], began) if keep else [])

    def _run(self, plan: Step, reqs: list[Request], began: float) -> list[Request]:
        """Run the step (begun at `began`), sample and hand out its tokens."""
        chunks = [(n, s.num_computed) for s, n in zip(plan.seqs, plan.new) if s.prefilling]
        opens = any(s.opening for s in plan.seqs)
        # (new, cached) prompt tokens of each prefilling row; a prompt's cached prefix counts in its first chunk
        prefill = [
            (n, s.cached_tokens if s.opening else 0)
            for s, n in zip(plan.seqs, plan.new)
            if s.prefilling
        ]
        tokens, want, score = [], [], {}
        for i, (req, n) in enumerate(zip(reqs, plan.new)):
            s = req.seq
            if s.prefilling:  # a retracted request computes its output so far again, as prompt
                tokens.extend(s.tokens[s.num_computed : s.num_computed + n])
                scored = req.prompt_score(s.num_computed, n)
                if scored is not None:
                    score[i] = PromptScore(*scored, req.top_logprobs_num or 0)
            else:  # a decode step computes the newest sampled token; no copy of the whole history
                tokens.append(req.output_ids[-1])
            if s.num_computed + n >= s.prompt_len:
                want.append(i)
        logits, scores = self.runner.run(
            [s.rid for s in plan.seqs],
            [s.num_computed for s in plan.seqs],
            plan.new,
            tokens,
            want,
            score,
        )
        for i, (picked, top) in scores.items():
            reqs[i].add_prompt_logprobs(picked, top)
        self.scheduler.advance(plan)
        out = self._deliver([reqs[i] for i in want], self._sample(logits, [reqs[i] for i in want]))
        self._landed_at = time.perf_counter()
        self._observe(
            chunks, prefill, len(plan.seqs) - len(prefill), self._landed_at - began, opens
        )
        return out

    def _launch(self, plan: Step, reqs: list[Request]) -> torch.Tensor:
        """Launch a decode step whose input tokens may still be on the device (the step in flight's); its
        logits."""
        ids = input_ids(reqs, self._inflight, self.device)
        logits, _ = self.runner.run(
            [s.rid for s in plan.seqs],
            [s.num_computed for s in plan.seqs],
            plan.new,
            [],
            list(range(len(reqs))),
            ids=ids,
        )
        self.scheduler.advance(plan)
        return logits

    def _draw(self, reqs: list[Request], logits: torch.Tensor) -> InFlight:
        """The step's samples, left on the device; when the batch raises, each row alone (as `_sample`)."""
        try:
            return InFlight.of(reqs, draw(logits, reqs, self._generator, self._processed))
        except Exception:
            log.exception("sampling the batch failed; sampling its rows one by one")
        return InFlight.on_host(reqs, self._sample(logits, reqs, batch=False), self.device)

    def _land(self) -> list[Request]:
        """The step in flight's tokens handed out (none in flight: [])."""
        step, self._inflight = self._inflight, None
        if step is None:
            return []
        out = self._deliver(step.reqs, step.chosen())
        began, self._landed_at = max(step.launched, self._landed_at), time.perf_counter()
        self.step_log.overlapped_steps += 1
        self._observe([], [], len(step.reqs), self._landed_at - began)
        return out

    def _deliver(self, reqs: list[Request], chosen: list) -> list[Request]:
        """Append each request's token (or fail it with its sampling error); retire those that end."""
        with self._lock:
            out = []
            for req, s in zip(reqs, chosen):
                if req.finished:  # aborted while the step ran, or ended in the step before
                    continue
                if isinstance(s, Exception):
                    req.fail(f"sampling failed: {type(s).__name__}: {s}")
                else:
                    req.append(s, self.tokenizer)
                out.append(req)
                if req.finished:
                    self._retire(req)
        return out

    def _observe(
        self, chunks: list, prefill: list, decoding: int, seconds: float, opens: bool = False
    ) -> None:
        self.step_log.record(chunks, prefill, decoding, seconds)
        if self.scheduler.cost:
            self.scheduler.cost.observe(chunks, decoding, seconds, opens)
        self.step_log.allocator(self._allocator_retries())

    @property
    def _processed(self) -> bool:
        return self.options.logprobs_mode == "processed"

    def _sample(self, logits: torch.Tensor, rows: list[Request], batch: bool = True) -> list:
        """The step's samples; when the batch raises (or `batch` is False), each row alone, so that a row that
        still raises gets its exception (it alone ends) and the others their tokens."""
        if batch:
            try:
                return sample(logits, rows, self._generator, self._processed)
            except Exception:
                log.exception("sampling the batch failed; sampling its rows one by one")
        out = []
        for i, row in enumerate(rows):
            try:
                out.append(sample(logits[i : i + 1], [row], self._generator, self._processed)[0])
            except Exception as e:
                out.append(e)
        return out

    def _allocator_retries(self) -> int:
        # the nested dict, not memory_stats(): that flattens ~100 counters in Python, every step
        return (
            torch.cuda.memory_stats_as_nested_dict(self.device).get("num_alloc_retries", 0)
            if self.device.type == "cuda"
            else 0
        )

    def _schedule(self, admit: bool = True):
        """The next step's plan, with the policy told of retracted requests and bound to the pages of grown and
        newly admitted ones (call under the lock)."""
        plan = self.scheduler.schedule(admit)
        if plan is None:
            return None
        for seq in plan.retracted:
            self.policy.release(seq.rid)
        for seq, pages in plan.grown:
            self.policy.grow(seq.rid, pages)
        for seq, pages in plan.admitted:
            self.policy.add_request(seq.rid, pages, seq.prompt_len, seq.partial_page)
        return plan

    def _retire(self, req: Request) -> None:
        self.scheduler.finish(req.rid, req.input_ids + req.output_ids)
        self.policy.release(req.rid)
        self.requests.pop(req.rid, None)

    # ---- offline API ----------------------------------------------------------------------------------------
    def generate(self, prompt: str | list[str] | None = None, input_ids=None, sampling_params=None):
        """Generate for one prompt (returns a dict) or a list (returns a list); all are decoded as one batch."""
        batched = isinstance(prompt, list) or (
            isinstance(input_ids, list) and input_ids and isinstance(input_ids[0], list)
        )
        if batched:
            items = (
                [(p, None) for p in prompt]
                if prompt is not None
                else [(None, ids) for ids in input_ids]
            )
        else:
            items = [(prompt, input_ids)]
        if not items:
            raise InvalidRequestError("the prompt list is empty")
        plist = (
            sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(items)
        )
        if len(plist) != len(items):
            raise InvalidRequestError("sampling_params list must match the number of prompts")
        prepared = [
            (self.tokenize(p, ids), SamplingParams.from_any(sp, self.options.input_limits))
            for (p, ids), sp in zip(items, plist)
        ]
        reqs = []
        try:
            for ids, sp in prepared:
                reqs.append(self.add_request(ids, sp))
            while not all(r.finished for r in reqs):
                self.step()
        except BaseException:
            for r in reqs:
                self.abort(r.rid)
            raise
        results = [r.result() for r in reqs]
        return results if batched else results[0]

    def score(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        """Log-probabilities of each continuation token given the prompt and the previous continuation tokens,
        decoded step by step through the KV policy (so decode-time compression is what is measured)."""
        return [r.output_logprobs for r in self.forced(prompts, continuations)]

    def forced(
        self, prompts: list[list[int]], continuations: list[list[int]], top: int = 0
    ) -> list[Request]:
        """The finished requests of `score` (output_logprobs; output_top_logprobs: each step's `top`)."""
        reqs = []
        try:
            for ids, cont in zip(prompts, continuations):
                sp = SamplingParams(max_new_tokens=len(cont), temperature=0, ignore_eos=True)
                req = self.add_request(self.tokenize(None, ids), sp)
                req.forced_ids, req.top_logprobs_num = list(cont), top
                reqs.append(req)
            while not all(r.finished for r in reqs):
                self.step()
        finally:
            for r in reqs:
                self.abort(r.rid)
        return reqs

    def next_token_logits(self, input_ids: list[int]) -> torch.Tensor:
        """Float32 logits [vocab] after the prompt, computed through the normal paged path (admit, prefill,
        release); only for an idle engine (tests, calibration)."""
        self._land()
        req = self.add_request(self.tokenize(None, input_ids), SamplingParams(max_new_tokens=1))
        try:
            with self._lock:
                plan = self._schedule()
            start = req.seq.num_computed  # a cached prefix is not computed again
            assert plan.seqs == [req.seq] and plan.new == [len(input_ids) - start], (
                "engine must be idle"
            )
            return self.runner.forward([req.rid], [start], plan.new, req.input_ids[start:], [0])[0]
        finally:
            self.abort(req.rid)

    def calibrate(
        self,
        text: str | None = None,
        tokens: int | None = None,
        tau: float = 0.2,
        target: float = TARGET,
        keep_quant_layers: list[int] | None = None,
    ) -> Calibration:
        """Calibrate the model on the first `tokens` tokens of `text` (default: the longest the device, model and
        text allow; the essays), on every rank at once, and cache the plan (`tailorkv calibrate`; at start for a
        model without one). An idle engine only."""
        ids = prompt_ids(self.model, self.tokenizer, self.device, text, tokens)
        message = ("rank", "calibrate", (ids, tau, target, keep_quant_layers), {})
        if self.workers:
            self.workers.group.broadcast(message)
        cal = self._rank.calibrate(*message[2])
        save_plan(self.config.name, cal.quant_layers, cal.scores, tau, cal.budget)
        return cal

    def shutdown(self) -> None:
        for rid in list(self.requests):
            self.abort(rid, "engine shut down")
        if self.workers:
            self.workers.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
