"""EleutherAI's lm-evaluation-harness in process: `JaxlmLM`, a harness model over a jaxlm run
(or an imported model), and `run_tasks`, which resolves task names and local YAML task files
and runs them.

The harness's three request types map onto jaxlm: `loglikelihood` onto batched continuation
scoring (`jaxlm.evals.scoring`), `loglikelihood_rolling` onto rolling windows over the model's
context, `generate_until` onto the compiled sampler (`jaxlm.sample.generate`), with `until`
strings that are one token as stop tokens and every `until` string cutting the text. Context
and continuation are tokenized as the harness's own Hugging Face backend does (the whole text,
then split at the context's length), so log-likelihoods are comparable with it.

Needs the `eval` extra: `pip install 'jaxlm[eval]'` (lm-eval).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxlm import storage
from jaxlm.configs.run import RunConfig
from jaxlm.data.tokenizer import ByteTokenizer, Tokenizer
from jaxlm.evals.scoring import (
    check_scoring_model,
    context_window,
    score_continuations,
    score_documents,
)

try:
    import lm_eval
    from lm_eval.api.model import TemplateLM
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "downstream evaluation needs lm-evaluation-harness: pip install 'jaxlm[eval]' "
        f"(or pip install lm-eval) ({e})"
    ) from e

DEFAULT_MAX_GEN_TOKS = 256
# A token id inside rendered chat text (an end-of-turn id with no text of its own):
# tok_encode turns "\ue003<id>\ue004" back into that id.
_ID_OPEN, _ID_CLOSE = "\ue003", "\ue004"


def _log_stderr(message: str) -> None:
    import jax

    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


class JaxlmLM(TemplateLM):
    """An lm-evaluation-harness model over a jaxlm causal LM: its run config, parameters and
    tokenizer (`JaxlmLM.from_workdir(DIR)` loads a run or an imported model).

    `batch_size` rows are scored per forward pass (split over `mesh`'s batch axes when it
    divides them); `max_gen_toks` is the generation budget when a task sets none.
    """

    backend = "causal"

    def __init__(
        self,
        config: RunConfig,
        params: Any,
        tokenizer: Tokenizer,
        mesh: Any = None,
        batch_size: int = 16,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        log: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__()
        check_scoring_model(config.model)
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
        if not (isinstance(max_gen_toks, int) and max_gen_toks >= 1):
            raise ValueError(f"max_gen_toks={max_gen_toks!r} must be an integer >= 1")
        self.config, self.params, self._tok, self.mesh = config, params, tokenizer, mesh
        self.batch_size, self.max_gen_toks = batch_size, max_gen_toks
        self.log = log or _log_stderr
        self.add_bos = config.data.add_bos
        # Requests whose context was cut to fit, counted over this model's life.
        self.truncated = 0
        self.step: int | None = None  # the checkpoint's step, when loaded from a workdir

    @classmethod
    def from_workdir(
        cls, workdir: str | os.PathLike, step: int | None = None, **kwargs: Any
    ) -> JaxlmLM:
        """The model of a jaxlm run directory (or an imported model), at `step` (default: the
        newest checkpoint that restores), on a mesh over this machine's devices."""
        from jaxlm.run import load_step_for_eval

        found, config, mesh, params, tokenizer = load_step_for_eval(workdir, step)
        lm = cls(config, params, tokenizer, mesh=mesh, **kwargs)
        lm.step = found
        return lm

    # --- tokens ------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self._tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: BOS for a run trained with BOS, else EOS
        (the token before a document in a stream of them)."""
        return self._tok.bos_id if self.add_bos else self._tok.eos_id

    @property
    def max_length(self) -> int:
        return context_window(self.config.model)

    @property
    def tokenizer_name(self) -> str:
        from jaxlm.checkpoint import tokenizer_files

        blob = json.dumps(tokenizer_files(self._tok), sort_keys=True, default=str)
        return f"jaxlm-{type(self._tok).__name__}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        ids: list[int] = []
        rest = string
        while _ID_OPEN in rest:  # token ids written into rendered chat text
            head, _, tail = rest.partition(_ID_OPEN)
            number, _, rest = tail.partition(_ID_CLOSE)
            ids += (self._tok.encode(head) if head else []) + [int(number)]
        ids += self._tok.encode(rest) if rest else []
        if self.add_bos and add_special_tokens is not False:
            ids = [self._tok.bos_id, *ids]
        return ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        if isinstance(self._tok, ByteTokenizer):
            return self._tok.decode(ids, errors="replace")
        return self._tok.decode(ids)

    # --- requests ----------------------------------------------------------------------------

    def _on_mesh(self) -> Any:
        from jaxlm.sharding import use_mesh

        if self.mesh is None:
            return contextlib.nullcontext()
        return use_mesh(self.mesh, self.config.mesh.rules)

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], **kwargs: Any
    ) -> list[tuple[float, bool]]:
        pairs = [(list(c), list(x)) for _, c, x in requests]
        with self._on_mesh():
            scores = score_continuations(
                self.config.model,
                self.params,
                pairs,
                self.batch_size,
                self._tok.pad_id,
                mesh=self.mesh,
            )
        cut = sum(s.truncated for s in scores)
        if cut:
            self.truncated += cut
            self.log(
                f"jaxlm eval: {cut} of {len(scores)} requests are longer than the model's "
                f"context of {self.max_length} tokens; their contexts were cut from the left "
                "(as the harness does)"
            )
        out = []
        for (key, _, _), s in zip(requests, scores, strict=True):
            answer = (s.logprob, s.greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        texts = [req.args[0] for req in requests]
        docs = [self.tok_encode(t, add_special_tokens=False) for t in texts]
        with self._on_mesh():
            totals = score_documents(
                self.config.model,
                self.params,
                docs,
                self.prefix_token_id,
                batch_size=self.batch_size,
                pad_id=self._tok.pad_id,
                mesh=self.mesh,
            )
        for text, total in zip(texts, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from jaxlm import sample

        jobs = [self._generation_job(i, *req.args) for i, req in enumerate(requests)]
        window = self.max_length
        clamped = sorted({j["asked"] for j in jobs if j["asked"] >= window})
        if clamped:
            self.log(
                f"jaxlm eval: max_gen_toks {clamped} do not fit the model's context of {window} "
                f"tokens; those requests generate at most {window - 1}"
            )
        cut = [j["cut"] for j in jobs if j["cut"]]
        if cut:
            self.truncated += len(cut)
            self.log(
                f"jaxlm eval: {len(cut)} of {len(jobs)} generation requests had their contexts "
                f"cut from the left (by up to {max(cut)} tokens) to leave room for the new "
                f"tokens in the model's context of {window}"
            )
        out: list[str] = [""] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job["group"], []).append(i)
        for (budget, chain, seed), members in groups.items():
            members.sort(key=lambda i: -len(jobs[i]["prompt"]))
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                # A full batch every time (copies of the first prompt), so one program serves.
                prompts = [jobs[i]["prompt"] for i in batch]
                prompts += [prompts[0]] * (self.batch_size - len(prompts))
                stops = [jobs[i]["stop"] for i in batch]
                stops += [stops[0]] * (self.batch_size - len(stops))
                kwargs = dict(key=seed, chain=chain, stop_tokens=stops, pad_id=self._tok.pad_id)
                with self._on_mesh():
                    new = sample.generate(self.config.model, self.params, prompts, budget, **kwargs)
                for i, ids in zip(batch, new, strict=False):
                    ids = [t for t in ids if t != self.eot_token_id]
                    text = self.tok_decode(ids)
                    for stop in jobs[i]["until"]:
                        if stop:
                            text = text.split(stop, 1)[0]
                    out[i] = text
                    self.cache_hook.add_partial(
                        "generate_until", (jobs[i]["context"], jobs[i]["kwargs"]), text
                    )
        return out

    def _generation_job(self, i: int, context: str, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        from jaxlm import sample

        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        eot = self.tok_decode([self.eot_token_id])
        if eot and eot not in until and not isinstance(self._tok, ByteTokenizer):
            until.append(eot)
        budget = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        if budget < 1:
            raise ValueError(f"generation request {i}: max_gen_toks={budget} must be >= 1")
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        top_p = kwargs.pop("top_p", None)
        top_k = kwargs.pop("top_k", None)
        seed = int(kwargs.pop("seed", 0) or 0)
        if do_sample and temperature > 0:
            chain = sample.strategies(temperature, top_k, top_p)
        else:
            chain = sample.strategies(0.0)
        window = self.max_length
        asked = budget
        budget = min(budget, window - 1)  # at least one token of context
        prompt = self.tok_encode(context) if context else [self.prefix_token_id]
        cut = max(len(prompt) + budget - window, 0)
        prompt = prompt[cut:]
        # `until` strings that are one token end a row early; every string cuts the text.
        stop = [self.eot_token_id]
        for s in until:
            ids = self.tok_encode(s, add_special_tokens=False)
            if len(ids) == 1 and ids[0] not in stop:
                stop.append(ids[0])
        return dict(
            prompt=prompt,
            cut=cut,
            asked=asked,
            stop=stop,
            until=until,
            context=context,
            kwargs=gen_kwargs,
            group=(budget, chain, seed),
        )

    # --- chat --------------------------------------------------------------------------------

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.config.task.chat_template

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The run's chat template (`task.chat_template`) rendered as text; token ids without
        text of their own (an end-of-turn EOS) are kept as ids through `tok_encode`."""
        from jaxlm.data.chat import get_template

        template = get_template(self.config.task.chat_template, self._tok)
        pieces = template.render(chat_history, add_generation_prompt)
        return "".join(
            f"{_ID_OPEN}{p.text}{_ID_CLOSE}" if isinstance(p.text, int) else p.text for p in pieces
        )


# --- tasks ---------------------------------------------------------------------------------------

YAML_SUFFIXES = (".yaml", ".yml")


def check_task_file(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed task (or group) config of a harness YAML file; a `ValueError` naming the file
    and line where it does not parse, or where it names no task or group."""
    import yaml
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        cfg = load_yaml(path, resolve_func=False, recursive=True)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{mark.name}:{mark.line + 1}" if mark is not None else str(path)
        raise ValueError(f"task file {where}: does not parse: {e.problem or e}") from e
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise ValueError(f"task file {path}: cannot be read: {e}") from e
    if not (isinstance(cfg, dict) and ("task" in cfg or "group" in cfg)):
        raise ValueError(f"task file {path}:1: has no 'task' (or 'group') key")
    return cfg


def _is_file_spec(spec: str) -> bool:
    return spec.endswith(YAML_SUFFIXES) or os.path.isfile(spec)


def resolve_tasks(
    specs: Sequence[str], include_paths: Sequence[str | os.PathLike] = ()
) -> tuple[Any, list[str]]:
    """(a harness `TaskManager`, the task specs to run): each spec is a task name (a harness
    task, or one defined by a YAML file under `include_paths`) or a YAML task file. Every
    local task file is parsed first; an unknown name lists the close ones."""
    from lm_eval.tasks import TaskManager

    specs = [s.strip() for s in specs if s.strip()]
    if not specs:
        raise ValueError("no tasks given: name harness tasks or YAML task files (--tasks A,B)")
    for d in include_paths:
        if not Path(d).is_dir():
            raise FileNotFoundError(f"task directory {str(d)!r} does not exist")
        for f in sorted(Path(d).glob("**/*.yaml")):
            check_task_file(f)
    out = []
    for spec in specs:
        if _is_file_spec(spec):
            if not Path(spec).is_file():
                raise FileNotFoundError(f"task file {spec!r} does not exist")
            check_task_file(spec)
            out.append(str(Path(spec).resolve()))
        else:
            out.append(spec)
    names = [s for s in out if not _is_file_spec(s)]
    manager = TaskManager(
        include_path=[str(p) for p in include_paths] or None, include_defaults=bool(names)
    )
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            hint = f"; close: {', '.join(close)}" if close else ""
            raise ValueError(
                f"unknown task {name!r} (not a harness task, nor defined under "
                f"{[str(p) for p in include_paths] or 'any --include-path'}){hint}"
            )
    return manager, out


def run_tasks(
    lm: JaxlmLM,
    specs: Sequence[str],
    num_fewshot: int | None = None,
    limit: int | None = None,
    include_paths: Sequence[str | os.PathLike] = (),
    log_samples: bool = False,
    seed: int = 0,
    bootstrap_iters: int = 1000,
    apply_chat_template: bool = False,
    fewshot_as_multiturn: bool | None = None,
    system_instruction: str | None = None,
) -> dict[str, Any]:
    """Run harness tasks on `lm`; the harness's results dict (per-task metrics under
    "results", with "configs", "n-shot", ...; per-document "samples" when `log_samples`), as
    JSON-ready values. `limit`: at most this many documents per task; `bootstrap_iters`:
    resamples for the standard errors of metrics that need them (0 = no standard errors).

    `apply_chat_template`: each prompt rendered with the run's chat template
    (`task.chat_template`) as a user turn, few-shot examples as earlier turns
    (`fewshot_as_multiturn`, default: with the chat template), after `system_instruction`."""
    if num_fewshot is not None and not (isinstance(num_fewshot, int) and num_fewshot >= 0):
        raise ValueError(f"num_fewshot={num_fewshot!r} must be an integer >= 0")
    if limit is not None and not (isinstance(limit, int) and limit >= 1):
        raise ValueError(f"limit={limit!r} must be an integer >= 1 (documents per task)")
    manager, tasks = resolve_tasks(specs, include_paths)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=log_samples,
        bootstrap_iters=bootstrap_iters,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        apply_chat_template=apply_chat_template,
        fewshot_as_multiturn=(
            apply_chat_template if fewshot_as_multiturn is None else fewshot_as_multiturn
        ),
        system_instruction=system_instruction,
    )
    return json.loads(json.dumps(results, default=_jsonable))


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, set):
        return sorted(x)
    return str(x)


def headline(results: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of each task as flat `"task/metric": value` pairs (stderr and
    filter suffixes dropped where the filter is "none")."""
    flat = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if not isinstance(value, int | float) or isinstance(value, bool):
                continue
            metric, _, filt = key.partition(",")
            if metric in ("sample_len",) or "_stderr" in metric:
                continue
            name = metric if filt in ("", "none") else f"{metric}_{filt}"
            flat[f"{task}/{name}"] = float(value)
    return flat


def write_task(
    directory: str | os.PathLike, name: str, records: Sequence[dict[str, Any]], **fields: Any
) -> Path:
    """A local harness task: `records` as `<directory>/<name>.jsonl` and the task config
    `<directory>/<name>.yaml` reading it (offline, through the `json` dataset builder), with
    `fields` (e.g. `output_type`, `doc_to_text`, `metric_list`) as its YAML keys. Returns the
    YAML file's path, for `--tasks` / `run_tasks`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = (directory / f"{name}.jsonl").resolve()
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        **fields,
    }
    path = directory / f"{name}.yaml"
    # JSON is YAML: every value written exactly, quoting included.
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in config.items()))
    return path


def results_path(
    workdir: str | os.PathLike, step: int | None, results: dict[str, Any]
) -> storage.AnyPath:
    """Where `jaxlm eval --tasks` writes the results of a run: <workdir>/evals/
    step<step>_<tasks>.json (the tasks' names, shortened)."""
    names = "+".join(sorted(results.get("results", {}))) or "tasks"
    safe = "".join(c if c.isalnum() or c in "-_+." else "_" for c in names)[:80]
    return storage.as_path(workdir) / "evals" / f"step{step}_{safe}.json"
