"""Rule-based rewards: the recipe's math reward, and a bounded-time scorer that runs it in workers.

The default reward is EasyR1's ``math`` reward, the one the RLCS paper trained with
(``examples/reward_function/math.py`` in hiyouga/EasyR1):

- format: the response (after EasyR1's removal of whitespace around ``<``, ``>``, ``/``) must fully
  match ``<think>.*</think>.*\\boxed\\{.*\\}.*`` (DOTALL). We test the same language with ``str.find``
  instead of the regex: the regex backtracks polynomially on long adversarial text, ``find`` is linear;
  the whitespace rule is likewise re-implemented linearly (EasyR1's ``\\s*(<|>|/)\\s*`` is quadratic on
  long whitespace runs).
- accuracy: the content of the last ``\\boxed{...}`` (nested braces balanced; a truncated, unbalanced
  last box scores 0) against the ground truth, bare or boxed. An answer is correct when mathruler's
  grader (PRM800K rules, what EasyR1 calls) accepts it, or when math_verify's LaTeX parser and
  verifier do. The second checker only removes false negatives of the first (``10^{3}`` vs ``1000``,
  ``50\\%`` vs ``0.5``, ``\\frac{2}{4}`` vs ``\\frac12``); both reject different answers.
- ``overall = (1 - format_weight) * accuracy + format_weight * format``, ``format_weight = 0.1``.

Untrusted input. Model output must never reach ``eval``/``exec``. Where the checkers could do that:

- ``mathruler.grader.are_equal_under_sympy`` calls ``sympy.parsing.sympy_parser.parse_expr``, which
  turns the text into Python code and ``eval``-s it; its only filter is "at most two distinct letters"
  and a few power patterns, which lets ``9**9**9**9`` (a hang) or ``ff(9^9,9^9)`` through. We do not call
  ``grade_answer``; :func:`_mathruler_equal` repeats its control flow with mathruler's (string-only)
  normalizers and calls ``parse_expr`` only on text that :func:`_safe_for_sympy_parse` accepts: digits,
  ``. + - * / ^ ( )``, spaces, single-letter symbols and the words ``sqrt`` and ``pi`` (no other
  identifier, so nothing can name a builtin, attribute or sympy function; a dot only as a decimal
  point; no quotes, underscores, brackets, ``**``), at most 256 characters, numeric exponents whose
  product is at most 10**4.
- ``math_verify.parse`` with its default ``ExprExtractionConfig`` calls ``parse_expr`` as well. We only
  ever pass ``LatexExtractionConfig``, whose path is the ANTLR grammar of latex2sympy2_extended: it
  builds sympy objects from tokens; the only text it hands to sympy's parser is ``sympy.Number(text)``
  on NUMBER tokens, which its lexer restricts to digits and separators (``nsimplify``/``sympify`` get
  sympy objects; ``parse_expr`` of ``variable_values`` is never reached: we pass none). A test spies on
  ``parse_expr`` while scoring payloads and checks exactly this.
- pylatexenc's ``latex2text`` (used by mathruler's normalizer) is a pure text converter.

Bounded time. Even eval-free parsing can take unbounded time or memory (latex2sympy evaluates
``9^{9^{9^{9}}}`` and ``(10^{100})!`` with Python integers; its ANTLR parse is exponential in brace
depth). Cheap pre-filters skip the symbolic checkers on the known cases (:func:`_safe_for_latex_parse`),
but the guarantee is :class:`RewardScorer`: scoring runs in persistent worker processes, each a fresh
interpreter (fork+exec, never a bare fork of a trainer that holds threads and CUDA state), with a
per-sample deadline and an address-space limit; a sample past its deadline gets accuracy 0, is counted,
and its worker is killed and replaced. Call :func:`compute_score` directly only on trusted text or
inside such a worker.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import math
import os
import re
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

import sympy
from math_verify import LatexExtractionConfig, parse, verify
from mathruler.grader import _is_frac, _normalize, _str_is_int, should_allow_eval, split_tuple
from mathruler.math_normalize import normalize_answer
from sympy.parsing import sympy_parser

logger = logging.getLogger(__name__)

FORMAT_WEIGHT = 0.1
# Longer answers (boxed content or ground truth) are compared as strings only: real answers are short,
# and every symbolic step is at least linear in the length, some far worse.
MAX_ANSWER_CHARS = 1000
MAX_SYMPY_CHARS = 256
MAX_EXPONENT_PRODUCT = 10_000
# latex2sympy's ANTLR parse takes ~1 s at 16 nested braces and ~17 s at 18 (measured).
MAX_BRACE_DEPTH = 10
MAX_FACTORIAL_DIGITS = 4

_BOXED = "\\boxed{"
_SYMPY_CHARS = re.compile(r"[0-9a-z.+\-*/^() ]*")
_LETTER_RUN = re.compile(r"[a-z]+")
_BAD_DOT = re.compile(r"[a-z).]\.|\.(?![0-9])")
_SYMPY_EXPONENT = re.compile(r"\^(-?)([0-9]+|[a-z])")
_POWER_TOWER = re.compile(r"\^-?([0-9]+|[a-z])\^")  # a^b^c is a^(b^c): the product bound does not apply
_LATEX_CONFIG = [LatexExtractionConfig(boxed_match_priority=0)]


# ---------------------------------------------------------------------------------------------------------
# The math reward (pure functions; safe to call in-process on trusted text, bounded only in RewardScorer)
# ---------------------------------------------------------------------------------------------------------


def normalize_response(response: str) -> str:
    """EasyR1's ``re.sub(r"\\s*(<|>|/)\\s*", r"\\1", response)`` in linear time.

    A whitespace run is dropped when the character before or after it is ``<``, ``>`` or ``/`` (Qwen2.5-VL
    32B writes ``< think >``); each run is matched once, so long runs cost O(n), not O(n^2).
    """

    def drop_if_next_to_tag(m: re.Match[str]) -> str:
        before = response[m.start() - 1] if m.start() > 0 else ""
        after = response[m.end()] if m.end() < len(response) else ""
        return "" if (before and before in "<>/") or (after and after in "<>/") else m.group(0)

    return re.sub(r"\s+", drop_if_next_to_tag, response)


def format_reward(response: str) -> float:
    """1.0 when the (normalized) response is ``<think>…</think>…\\boxed{…}…``, else 0.0.

    Same language as EasyR1's ``re.fullmatch(r"<think>.*</think>.*\\\\boxed\\{.*\\}.*", response, DOTALL)``:
    the earliest ``</think>`` and the earliest ``\\boxed{`` after it leave the most room for the rest.
    """
    if not response.startswith("<think>"):
        return 0.0
    close = response.find("</think>", len("<think>"))
    if close < 0:
        return 0.0
    box = response.find(_BOXED, close + len("</think>"))
    if box < 0:
        return 0.0
    return 1.0 if response.find("}", box + len(_BOXED)) >= 0 else 0.0


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with nested braces balanced; None if absent or unbalanced."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth = 0
    begin = start + len(_BOXED)
    for i in range(begin, len(text)):
        char = text[i]
        if char == "{":
            depth += 1
        elif char == "}":
            if depth == 0:
                return text[begin:i].strip()
            depth -= 1
    return None


def _safe_for_sympy_parse(expr: str) -> bool:
    """Allow-list for text handed to sympy's ``parse_expr`` (which ``eval``-s it); see module docstring."""
    if len(expr) > MAX_SYMPY_CHARS or "**" in expr or not _SYMPY_CHARS.fullmatch(expr):
        return False
    if any(len(run) > 1 and run not in ("sqrt", "pi") for run in _LETTER_RUN.findall(expr)):
        return False
    # A dot is a decimal point or nothing: "pi.n(999999)" would be an attribute call (pi to 1e6 digits).
    if _BAD_DOT.search(expr):
        return False
    # Every "^" must be followed by a plain number or one symbol, and the numeric exponents must stay
    # small even when nested through parentheses, ((9^99)^99)^99 included: bound their product.
    if expr.count("^") != len(_SYMPY_EXPONENT.findall(expr)) or _POWER_TOWER.search(expr):
        return False
    product = 1
    for _, exponent in _SYMPY_EXPONENT.findall(expr):
        if exponent.isdigit():
            product *= max(int(exponent), 1)
            if product > MAX_EXPONENT_PRODUCT:
                return False
    return True


def _safe_for_latex_parse(latex: str) -> bool:
    """Cheap filter against inputs known to stall latex2sympy (the worker deadline is the real bound)."""
    depth = 0
    for char in latex:
        if char == "{":
            depth += 1
            if depth > MAX_BRACE_DEPTH:
                return False
        elif char == "}":
            depth -= 1
    # Power towers and big exponents are evaluated eagerly with Python integers (2^{10^{10}} hangs;
    # 2^{2023}, a real competition answer, takes microseconds).
    for match in re.finditer(r"\^\s*", latex):
        rest = latex[match.end() :]
        exponent = rest[:1]
        if rest.startswith("{"):
            exponent = _balanced_prefix(rest)
        elif rest[:1] in "+-" or rest[:1].isdigit():
            exponent = re.match(r"[+-]?\s*\d*", rest).group(0)
        if "^" in exponent or re.search(r"\d{5,}", exponent):
            return False
    return re.search(rf"\d{{{MAX_FACTORIAL_DIGITS + 1},}}\s*!", latex) is None


def _balanced_prefix(text: str) -> str:
    """The ``{...}`` group that opens ``text`` (or the rest of the text when it never closes)."""
    depth = 0
    for i, char in enumerate(text):
        depth += char == "{"
        depth -= char == "}"
        if depth == 0:
            return text[: i + 1]
    return text


def _equal_under_sympy(ground_truth: str, given: str) -> bool:
    expr = f"({ground_truth})-({given})"
    if not should_allow_eval(expr) or not _safe_for_sympy_parse(expr):
        return False
    try:
        diff = sympy_parser.parse_expr(
            expr.replace("^", "**"),
            transformations=sympy_parser.standard_transformations
            + (sympy_parser.implicit_multiplication_application,),
        )
        return sympy.simplify(diff) == 0
    except Exception:  # a malformed expression is simply not equal
        return False


def _mathruler_equal(given: str, ground_truth: str) -> bool:
    """``mathruler.grader.grade_answer`` (PRM800K rules) with the sympy step behind our allow-list."""
    if normalize_answer(ground_truth) == normalize_answer(given):
        return True
    truth_norm, given_norm = _normalize(ground_truth), _normalize(given)
    if truth_norm == given_norm:
        return True
    if not given_norm:
        return False
    truth_elems, given_elems = split_tuple(truth_norm), split_tuple(given_norm)
    # Tuples and intervals: the brackets must agree, then the elements one by one.
    if len(truth_elems) > 1 and (truth_norm[0] != given_norm[0] or truth_norm[-1] != given_norm[-1]):
        return False
    if len(truth_elems) != len(given_elems):
        return False
    for truth_elem, given_elem in zip(truth_elems, given_elems):
        if _is_frac(truth_elem) and _is_frac(given_elem):
            equal = truth_elem == given_elem  # PRM800K: an unreduced fraction is not the answer
        elif _str_is_int(truth_elem) != _str_is_int(given_elem):
            equal = False  # an integer ground truth needs an integer answer, no sympy leniency
        else:
            equal = _equal_under_sympy(truth_elem, given_elem)
        if not equal:
            return False
    return True


def _math_verify_equal(given: str, ground_truth: str) -> bool:
    if not (_safe_for_latex_parse(given) and _safe_for_latex_parse(ground_truth)):
        return False
    # LaTeX extraction only: the default ExprExtractionConfig path runs sympy's eval-based parse_expr.
    # Timeouts off: math_verify's SIGALRM only works on the main thread; RewardScorer bounds the time.
    gold = parse(_BOXED + ground_truth + "}", extraction_config=_LATEX_CONFIG, parsing_timeout=None)
    pred = parse(_BOXED + given + "}", extraction_config=_LATEX_CONFIG, parsing_timeout=None)
    return bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=None)


def is_equivalent(given: str, ground_truth: str) -> bool:
    """Whether an extracted answer equals the ground truth (both LaTeX or plain text)."""
    given, ground_truth = given.strip(), ground_truth.strip()
    if not given or not ground_truth:
        return False
    if given == ground_truth:
        return True
    if len(given) > MAX_ANSWER_CHARS or len(ground_truth) > MAX_ANSWER_CHARS:
        return False
    for checker in (_mathruler_equal, _math_verify_equal):
        try:
            if checker(given, ground_truth):
                return True
        except (RecursionError, MemoryError):
            raise
        except Exception:  # a checker failing on odd text is a "no" from that checker, not a crash
            continue
    return False


def compute_score(response: str, answer: str, *, format_weight: float = FORMAT_WEIGHT) -> dict[str, float]:
    """The recipe's math reward for one response: ``{"overall", "format", "accuracy"}``.

    ``answer`` is the ground truth, bare (``\\frac{1}{2}``) or boxed. Unbounded in time on adversarial
    text: train through :class:`RewardScorer`.
    """
    response, answer = normalize_response(str(response)), str(answer)  # datasets may store 5, not "5"
    format_score = format_reward(response)
    given = extract_boxed(response)
    truth = extract_boxed(answer) if _BOXED in answer else answer
    accuracy = 1.0 if given is not None and truth is not None and is_equivalent(given, truth) else 0.0
    return {
        "overall": (1.0 - format_weight) * accuracy + format_weight * format_score,
        "format": format_score,
        "accuracy": accuracy,
    }


# ---------------------------------------------------------------------------------------------------------
# Plug-in scorers: reward.function = "module:function"
# ---------------------------------------------------------------------------------------------------------

_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_PLUGIN_SPEC = re.compile(rf"({_DOTTED}):({_DOTTED})")


def load_reward_function(
    spec: str | None, format_weight: float = FORMAT_WEIGHT
) -> Callable[[str, str], Mapping]:
    """Import ``"module:function"`` by name (importlib, never eval) and bind ``format_weight`` if accepted.

    ``None`` gives the default :func:`compute_score`. User errors raise ``ValueError`` naming
    ``reward.function``.
    """
    if spec is None:
        fn: Callable = compute_score
    else:
        match = _PLUGIN_SPEC.fullmatch(spec) if isinstance(spec, str) else None
        if match is None:
            raise ValueError(
                "reward.function must be 'module:function' (e.g. 'my_rewards.math:compute_score'), got "
                f"{spec!r}"
            )
        module_name, attr_path = match.groups()
        try:
            obj = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"reward.function = {spec!r}: cannot import module {module_name!r} ({e})") from e
        for attr in attr_path.split("."):
            if not hasattr(obj, attr):
                raise ValueError(
                    f"reward.function = {spec!r}: module {module_name!r} has no attribute {attr_path!r}"
                )
            obj = getattr(obj, attr)
        if not callable(obj):
            raise ValueError(f"reward.function = {spec!r}: {attr_path!r} is not callable")
        fn = obj
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: call with the two positionals only
        params = {}
    takes_weight = "format_weight" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    if takes_weight:
        return lambda response, answer: fn(response, answer, format_weight=format_weight)
    return fn


def _validate_score(result: object) -> dict[str, float]:
    if not isinstance(result, Mapping) or "overall" not in result:
        raise TypeError(f"a reward function must return a dict with an 'overall' key, got {result!r:.200}")
    # a non-finite value passes through: scored 0 it would be invisible, while the GRPO step sees it and
    # skips the step on every rank (train/skipped_steps), and reward/non_finite counts it
    return {str(k): float(v) for k, v in result.items()}


# ---------------------------------------------------------------------------------------------------------
# Worker pool with per-sample deadlines
# ---------------------------------------------------------------------------------------------------------

_SYS_PATH_ENV = "RLCS_REWARD_WORKER_SYS_PATH"
_FD_ENV = "RLCS_REWARD_WORKER_FD"
# The worker is a fresh interpreter (fork+exec, safe from a trainer holding threads and CUDA). It is
# started with -c, not through multiprocessing's spawn/forkserver: those re-run the trainer's __main__
# module in every worker (importing torch, with gigabytes of mapped CUDA libraries, per restart).
_WORKER_CODE = (
    "import json, os, sys; "
    f"sys.path[:0] = [p for p in json.loads(os.environ['{_SYS_PATH_ENV}']) if p not in sys.path]; "
    "from rlcs_fast.rewards import _worker_main; "
    f"_worker_main(int(os.environ['{_FD_ENV}']))"
)


def _worker_main(fd: int) -> None:
    """Worker loop: receive ``[(index, response, answer), ...]``, answer each sample as it is scored."""
    import signal

    # Ctrl-C goes to the whole process group; the parent decides, workers must not print tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(fd)
    spec, format_weight, max_memory_mb = conn.recv()
    if max_memory_mb is not None:
        import resource

        limit = max_memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # Timeouts are ours, so math_verify's "timeout disabled" warning is noise here.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    fn = load_reward_function(spec, format_weight)
    conn.send(("ready",))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        for index, response, answer in message:
            try:
                conn.send(("ok", index, _validate_score(fn(response, answer))))
            except Exception as e:  # MemoryError and RecursionError included: one sample, not the batch
                conn.send(("error", index, f"{type(e).__name__}: {e}"[:500]))


@dataclass
class _Worker:
    process: subprocess.Popen
    conn: Connection
    ready: bool = False
    inflight: deque[int] = field(default_factory=deque)  # sample indices sent, not yet answered
    deadline: float | None = None  # when the sample at inflight[0] (or the start-up) must be done


class RewardScorer:
    """Scores batches of responses in a persistent pool of worker processes, each sample time-bounded.

    ``fn`` is ``"module:function"`` (``reward.function``) or None for :func:`compute_score`. A sample
    that runs past ``timeout_s`` or makes its scorer raise scores 0 (the default scorer keeps its
    format score, computed here in linear time) and is counted in ``num_timeouts`` / ``num_errors``
    (cumulative); a timed-out or crashed worker is killed and replaced. ``max_memory_mb`` caps each
    worker's address space (None: no cap). Work goes out in a few chunks per worker (one message per
    chunk) and comes back per sample, which is what lets a deadline name the sample that overran.
    Not thread-safe; POSIX only.
    """

    def __init__(
        self,
        fn: str | None = None,
        *,
        format_weight: float = FORMAT_WEIGHT,
        timeout_s: float = 5.0,
        num_workers: int = 2,
        max_memory_mb: int | None = 4096,
        start_timeout_s: float = 120.0,
    ) -> None:
        self._owner_pid = os.getpid()  # a forked copy of this object must not stop the owner's workers
        self._workers: list[_Worker] | None = None
        if not timeout_s > 0:
            raise ValueError(f"reward.timeout_s must be > 0, got {timeout_s}")
        if num_workers < 1:
            raise ValueError(f"reward.num_workers must be >= 1, got {num_workers}")
        # Import in the parent first so a bad plug-in stops the run here, with a clear message.
        load_reward_function(fn, format_weight)
        self.fn, self.format_weight, self.timeout_s = fn, format_weight, timeout_s
        self.max_memory_mb, self.start_timeout_s = max_memory_mb, start_timeout_s
        self.num_timeouts = 0
        self.num_errors = 0
        self._workers = [self._spawn() for _ in range(num_workers)]

    def _spawn(self) -> _Worker:
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ, **{_SYS_PATH_ENV: json.dumps(sys.path), _FD_ENV: str(child_sock.fileno())})
        process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE],
            env=env,
            pass_fds=(child_sock.fileno(),),
            stdin=subprocess.DEVNULL,
        )
        child_sock.close()
        conn = Connection(parent_sock.detach())
        conn.send((self.fn, self.format_weight, self.max_memory_mb))
        return _Worker(process, conn, deadline=time.monotonic() + self.start_timeout_s)

    @staticmethod
    def _kill(worker: _Worker) -> None:
        if worker.process.poll() is None:
            worker.process.kill()
        worker.process.wait()
        worker.conn.close()

    def _fallback(self, response: str) -> dict[str, float]:
        if self.fn is not None:
            return {"overall": 0.0, "format": 0.0, "accuracy": 0.0}
        format_score = format_reward(normalize_response(response))
        return {"overall": self.format_weight * format_score, "format": format_score, "accuracy": 0.0}

    def score(self, responses: list[str], answers: list[str]) -> list[dict[str, float]]:
        """Score ``responses[i]`` against ``answers[i]``; one dict per sample, in order."""
        if len(responses) != len(answers):
            raise ValueError(f"score() got {len(responses)} responses but {len(answers)} answers")
        if self._workers is None:
            raise RuntimeError("RewardScorer.score() called after close()")
        workers = self._workers
        n = len(responses)
        results: list[dict[str, float] | None] = [None] * n
        # A few chunks per worker keep the workers balanced when one sample is slow.
        chunk = max(1, math.ceil(n / (4 * len(workers))))
        todo: deque[list[int]] = deque(list(range(i, min(i + chunk, n))) for i in range(0, n, chunk))
        remaining = n

        def settle(index: int, value: dict[str, float]) -> None:
            nonlocal remaining
            results[index] = value
            remaining -= 1

        while remaining:
            now = time.monotonic()
            for slot, worker in enumerate(workers):
                if worker.ready and not worker.inflight and todo:
                    batch = todo.popleft()
                    try:
                        worker.conn.send([(i, responses[i], answers[i]) for i in batch])
                    except OSError:  # died while idle (e.g. the OOM killer): nothing of ours was lost
                        todo.appendleft(batch)
                        self._kill(worker)
                        workers[slot] = self._spawn()
                        continue
                    worker.inflight.extend(batch)
                    worker.deadline = now + self.timeout_s
            deadlines = [w.deadline for w in workers if w.deadline is not None]
            readable = set(
                wait([w.conn for w in workers], max(0.0, min(deadlines) - now) if deadlines else None)
            )
            now = time.monotonic()
            for slot, worker in enumerate(workers):
                died = False
                if worker.conn in readable:
                    try:
                        while worker.conn.poll():
                            message = worker.conn.recv()
                            if message[0] == "ready":
                                worker.ready, worker.deadline = True, None
                                continue
                            kind, index, payload = message
                            worker.inflight.remove(index)
                            if kind == "ok":
                                settle(index, payload)
                            else:
                                self.num_errors += 1
                                logger.debug("reward sample %d failed: %s", index, payload)
                                settle(index, self._fallback(responses[index]))
                            worker.deadline = now + self.timeout_s if worker.inflight else None
                    except (EOFError, OSError):
                        died = True
                if not died and (worker.deadline is None or now < worker.deadline):
                    continue
                if not worker.ready:
                    self._kill(worker)
                    raise RuntimeError(
                        f"reward worker for reward.function={self.fn!r} did not start "
                        f"(exit code {worker.process.returncode}); its error is printed above"
                    )
                if worker.inflight:
                    index = worker.inflight.popleft()
                    if died:
                        self.num_errors += 1  # e.g. killed by the kernel's OOM killer or a segfault
                    else:
                        self.num_timeouts += 1
                    logger.debug("reward sample %d %s", index, "crashed its worker" if died else "timed out")
                    settle(index, self._fallback(responses[index]))
                self._kill(worker)
                if worker.inflight:
                    todo.appendleft(list(worker.inflight))
                workers[slot] = self._spawn()
        return results  # type: ignore[return-value]

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        if self._workers is None:
            return
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        for worker in self._workers:
            try:
                worker.process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
            self._kill(worker)
        self._workers = None

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_workers", None) and os.getpid() == self._owner_pid:
            with contextlib.suppress(Exception):  # at interpreter exit, modules may already be gone
                self.close()
