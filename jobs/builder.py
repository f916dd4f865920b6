"""One job's fields, already typed by a format reader, checked and turned into a ``JobRow``.

The readers (CSV, JSONL, YAML) only know their syntax: they hand ``JobBuilder.build`` plain
values (``None`` where a field is absent) and it applies the rules every format shares:

- ``id``: stripped, NFC, no control characters, at most 512 characters; without one, a stable
  id is derived from the content (model, prompt, size, seed as given, prompt_extend, output
  as given, template variables), so the same row always gets the same id.
- ``seed``: 0..2147483647; without one, derived from the id so every job is reproducible.
- ``model``: the job's own, else the manifest's default, else the rules' default model; it
  must be one the caller's ``jobs.params.ModelRules`` knows.
- fan-out: a row that becomes several jobs (``variants: N``, a YAML matrix) gets one seed per
  job, never one seed for all. Without a seed each job's comes from its own id (which carries
  ``-v1``.. and the matrix values). A written seed is the first job's, and each further job of
  the row takes the next number: ``seed_offset`` 0, 1, 2, ... in the order the jobs are made
  (matrix combinations in order, the variants of each one after another), wrapping past
  2147483647 to 0. A seed set by the matrix itself is each combination's first variant's.
- ``variant`` k of N (N > 1): ``-vk`` goes at the end of the id and of the output file's stem
  (``{split}/{id}.png`` -> ``train/cat-001-v2.png``).
- ``size``: written as ``jobs.sizes`` reads it, resolved by the model's rules (its default
  when absent), stored explicitly as ``W*H``.
- ``n``, ``negative_prompt``, ``watermark``: checked by the model's rules; ``n`` defaults to
  the model's, the other two are stored only when given (``jobs.params``).
- ``prompt_extend``: the model's default when absent.
- ``prompt``: non-empty after stripping; over the model's limit is a warning (the service
  cuts it).
- templates: ``{name}`` in prompt and output, from id, seed, size, width, height, index and
  the job's variables (vars, extra columns, matrix values).
- variables are also stored with the job (``JobRow``'s last item, a JSON object in the
  manifest's order, ``None`` without any), typed as the format wrote them: numbers from JSONL
  and YAML stay numbers, CSV cells are text, booleans are ``"true"``/``"false"``. Matrix
  values that set a field (model, seed, size, n, prompt_extend) are that field, not a
  variable.

Errors are appended to the caller's list (a row may have several); ``build`` returns ``None``
for a row with errors. A valid job comes back as a ``JobRow`` (a ``JobSpec``'s fields as a
tuple, see ``jobs.spec``), the form it is imported in.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Mapping

from jobs.errors import ManifestError
from jobs.fields import MAX_ID_CHARS, MAX_SEED, one_line
from jobs.naming import OutputTemplate, compile_output
from jobs.params import ModelRules, dump_params
from jobs.spec import JobRow
from jobs.templates import Scalar, compile_template

__all__ = ["JobBuilder", "derive_id", "derive_seed"]

_LINE_BREAKS = frozenset({"Cc", "Zl", "Zp"})
_NOT_VARS = frozenset({"model", "seed", "size", "n", "prompt_extend"})  # matrix keys: fields
_VARS_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
# What JSONEncoder.encode builds for every dict it is given, built once: the same text
# (variables are flat, so its check for circular references has nothing to find) for a third
# of the cost, which a million-row manifest pays a million times. None without the C module.
_ENCODE_VARS = (
    None
    if json.encoder.c_make_encoder is None  # type: ignore[attr-defined]
    else json.encoder.c_make_encoder(  # type: ignore[attr-defined]
        None, _VARS_ENCODER.default, json.encoder.encode_basestring, None, ":", ",",
        False, False, True,
    )
)  # fmt: skip


# The JSON of one text variable, by (name, value): a CSV's extra column (a category, a style)
# mostly repeats a few values, and a lookup costs half the encoding (0.74 -> 0.38 us a row, in
# the helper process that paces a big import). Filled with the first _VARS_MEMO_MAX values (a
# column of unique values then costs one missed lookup a row).
_VARS_MEMO: dict[tuple[str, Scalar], str] = {}
_VARS_MEMO_MAX = 4096


def _vars_json(variables: Mapping[str, Scalar]) -> str:
    """The variables as a compact JSON object, in their order."""
    if _ENCODE_VARS is None:
        return _VARS_ENCODER.encode(variables)
    if len(variables) == 1:
        for item in variables.items():
            if type(item[1]) is str:  # (1, True and 1.0 are equal keys with other JSON)
                text = _VARS_MEMO.get(item)
                if text is None:
                    text = "".join(_ENCODE_VARS(variables, 0))
                    if len(_VARS_MEMO) < _VARS_MEMO_MAX:
                        _VARS_MEMO[item] = text
                return text
    return "".join(_ENCODE_VARS(variables, 0))


_SEED_HASH = hashlib.blake2b(digest_size=8, person=b"batcher-seed")


def derive_seed(job_id: str) -> int:
    """A stable seed in 0..MAX_SEED from a job id."""
    hasher = _SEED_HASH.copy()  # a third cheaper than a new keyed hasher per job
    hasher.update(job_id.encode())
    return int.from_bytes(hasher.digest(), "big") & MAX_SEED


def derive_id(
    model: str,
    prompt: str,
    size: str,
    seed: int | None,
    prompt_extend: bool,
    output: str | None,
    variables: Mapping[str, Scalar],
    given: tuple[int | None, str | None] = (None, None),
) -> str:
    """A stable 16-hex-digit id from a job's content (the seed and output as given).

    ``given`` is (n, params) as the manifest wrote them; only a job that gave one of them
    hashes them, so the ids of jobs without them stay what they always were.
    """
    content: list[object] = [model, prompt, size, seed, prompt_extend, output]
    content.append(sorted(variables.items()))
    if given != (None, None):
        content.append(list(given))
    blob = json.dumps(content, ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(blob.encode(), digest_size=8, person=b"batcher-id").hexdigest()


def _with_variant(path: str, variant: int) -> str:
    """``path`` with ``-v<variant>`` at the end of its file's stem."""
    folder, slash, name = path.rpartition("/")
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    return f"{folder}{slash}{stem}-v{variant}{dot}{ext}"


def _at(lines: Mapping[str, int] | None, line: int, field: str) -> int:
    """The line of ``field``: its own where the reader knows it, else the job's."""
    return line if lines is None else lines.get(field, line)


class JobBuilder:
    """Checks one job's fields and builds its ``JobRow``; shared by all formats.

    ``warnings`` receives non-fatal problems (at most ``max_warnings``; ``warning_count``
    counts them all).
    """

    def __init__(
        self,
        *,
        path: str,
        model: str,
        rules: ModelRules,
        output: OutputTemplate,
        warnings: list[ManifestError],
        max_warnings: int = 100,
        output_given: bool = False,
    ) -> None:
        self.path = path
        self.model = model
        self.rules = rules
        self.output = output
        self.output_given = output_given
        self.warnings = warnings
        self.max_warnings = max_warnings
        self.warning_count = 0
        # Set by a reader when every output is a function of the id alone (CSV without an
        # output column and an id-only template): then equal ids mean equal output keys.
        self.outputs_from_id = False
        self._sizes: dict[tuple[str, str | None], tuple[str, int, int] | str] = {}
        self._models: dict[str, str | None] = {}  # model -> its problem, or None
        # model -> (prompt limit, prompt_extend default, n default): asked once per model
        self._defaults: dict[str, tuple[int, bool, int]] = {}

    def error(self, errors: list[ManifestError], line: int, field: str | None, msg: str) -> None:
        """Record one located problem."""
        field = one_line(field) if field else field
        errors.append(ManifestError(self.path, line, field, one_line(msg)))

    def build(
        self,
        errors: list[ManifestError],
        line: int,
        index: int,
        job_id: str | None,
        prompt: str | None,
        size: str | None,
        seed: int | None,
        prompt_extend: bool | None,
        output: str | None,
        variables: Mapping[str, Scalar],
        lines: Mapping[str, int] | None = None,
        id_suffix: str = "",
        variant: int = 0,
        seed_offset: int = 0,
        *,
        model: str | None = None,
        n: int | None = None,
        negative_prompt: str | None = None,
        watermark: bool | None = None,
    ) -> JobRow | None:
        """The job's ``JobRow``, or ``None`` after appending its errors to ``errors``.

        ``lines`` maps a field to its own line where it differs from ``line`` (YAML);
        ``id_suffix`` is appended to the id (the matrix values of a fanned-out job); templates
        see ``{id}`` without it. ``variant`` (from 1; 0: the row has no variants) and
        ``seed_offset`` place the job in its row's fan-out (see the module docstring).
        ``model`` is the job's own (else the manifest's).
        """
        if variant:
            id_suffix = f"{id_suffix}-v{variant}"
        failed = len(errors)
        model_given = model is not None
        if model is None:
            model = self.model
        problem = self._models.get(model, "") if model is not None else None
        if problem == "":
            problem = self.rules.model_problem(model)
            if len(self._models) < 1000:
                self._models[model] = problem
        if problem is not None:
            where = _at(lines, line, "model") if model_given else line
            self.error(errors, where, "model", problem)
            return None
        size_text, width, height = "", 0, 0
        parsed = self._sizes.get((model, size))
        if parsed is None:
            parsed = self._parse_size(model, size)
        if isinstance(parsed, str):
            self.error(errors, _at(lines, line, "size"), "size", parsed)
        else:
            size_text, width, height = parsed
        params = None
        if n is not None or negative_prompt is not None or watermark is not None:
            for field, message in self.rules.param_problems(
                model, n=n, negative_prompt=negative_prompt, watermark=watermark
            ):
                self.error(errors, _at(lines, line, field), field, message)
            params = dump_params(negative_prompt, watermark)
        defaults = self._defaults.get(model)
        if defaults is None:
            defaults = self._model_defaults(model)
        limit, extend_default, n_default = defaults
        if prompt is None:
            self.error(errors, line, "prompt", "missing; every job needs a prompt")
        else:
            prompt = prompt.strip()
            if not prompt:
                self.error(errors, _at(lines, line, "prompt"), "prompt", "empty")
        extend = extend_default if prompt_extend is None else prompt_extend
        if job_id is None:
            given = (n, params)
            job_id = derive_id(
                model, prompt or "", size_text, seed, extend, output, variables, given
            )
        elif not (
            job_id.isascii()
            and job_id.isprintable()
            and 0 < len(job_id) <= MAX_ID_CHARS
            and job_id[0] != " "
            and job_id[-1] != " "
        ):
            job_id = self._check_id(errors, _at(lines, line, "id"), job_id)
        full_id = job_id
        if id_suffix and job_id is not None:
            full_id = job_id + id_suffix
            if len(full_id) > MAX_ID_CHARS:
                message = f"{full_id[:40]!r}... is over {MAX_ID_CHARS} characters"
                self.error(errors, _at(lines, line, "id"), "id", message)
                full_id = None
        if seed is None:
            if full_id is not None:
                seed = derive_seed(full_id)
        elif not 0 <= seed <= MAX_SEED:
            self.error(errors, _at(lines, line, "seed"), "seed", f"{seed} is outside 0..{MAX_SEED}")
        elif seed_offset:
            seed = (seed + seed_offset) % (MAX_SEED + 1)
        if len(errors) > failed or prompt is None or not job_id or not full_id or seed is None:
            return None
        template = (
            self.output
            if output is None
            else self._compile_output(errors, _at(lines, line, "output"), output)
        )
        if template is None:
            return None
        values: dict[str, Scalar] | None = None
        if "{" in prompt or "}" in prompt:
            values = self._values(variables, job_id, model, seed, size_text, width, height, index)
            try:
                prompt = compile_template(prompt).render(values).strip()
            except ValueError as exc:
                self.error(errors, _at(lines, line, "prompt"), "prompt", str(exc))
                return None
            if not prompt:
                self.error(errors, _at(lines, line, "prompt"), "prompt", "empty once filled in")
                return None
        if "\x00" in prompt:
            self.error(errors, _at(lines, line, "prompt"), "prompt", "contains a NUL character")
            return None
        # The implicit default names the file after the full id (matrix values and variant
        # too); a template the manifest wrote sees {id} as the job wrote it.
        implicit_name = output is None and not self.output_given
        try:
            if template.id_suffix is not None:
                path, key = template.render_id(full_id if implicit_name else job_id)
            else:
                if values is None:
                    values = self._values(
                        variables, job_id, model, seed, size_text, width, height, index
                    )
                path, key = template.render(values)
        except ValueError as exc:
            self.error(errors, _at(lines, line, "output"), "output", str(exc))
            return None
        if variant and not (template.id_suffix is not None and implicit_name):
            path, key = _with_variant(path, variant), _with_variant(key, variant)
        if len(prompt) > limit:
            self._warn(_at(lines, line, "prompt"), len(prompt), model, limit)
        count = n_default if n is None else n
        stored: str | None = None
        if variables:
            if _NOT_VARS.isdisjoint(variables):
                stored = _vars_json(variables)
            elif own := {k: v for k, v in variables.items() if k not in _NOT_VARS}:
                stored = _vars_json(own)
        return (
            full_id,
            line,
            model,
            prompt,
            size_text,
            seed,
            extend,
            path,
            key,
            count,
            params,
            stored,
        )

    @staticmethod
    def _values(
        variables: Mapping[str, Scalar],
        job_id: str,
        model: str,
        seed: int,
        size: str,
        width: int,
        height: int,
        index: int,
    ) -> dict[str, Scalar]:
        values = dict(variables)
        values.update(
            id=job_id, model=model, seed=seed, size=size, width=width, height=height, index=index
        )
        return values

    def _model_defaults(self, model: str) -> tuple[int, bool, int]:
        rules = self.rules
        found = (
            rules.prompt_limit(model),
            rules.prompt_extend_default(model),
            rules.n_default(model),
        )
        if len(self._defaults) < 1000:
            self._defaults[model] = found
        return found

    def _parse_size(self, model: str, size: str | None) -> tuple[str, int, int] | str:
        try:
            parsed: tuple[str, int, int] | str = self.rules.size(model, size)
        except ValueError as exc:
            parsed = str(exc)
        if len(self._sizes) < 10_000:
            self._sizes[(model, size)] = parsed
        return parsed

    def _check_id(self, errors: list[ManifestError], line: int, raw: str) -> str | None:
        job_id = raw.strip()
        if not job_id:
            self.error(errors, line, "id", "empty; leave it out to derive one from the content")
            return None
        if not job_id.isascii():
            job_id = unicodedata.normalize("NFC", job_id)
        if not job_id.isprintable() and any(
            unicodedata.category(c) in _LINE_BREAKS for c in job_id
        ):
            self.error(errors, line, "id", f"{job_id[:60]!r} contains a control character")
            return None
        if len(job_id) > MAX_ID_CHARS:
            self.error(errors, line, "id", f"{len(job_id)} characters; at most {MAX_ID_CHARS}")
            return None
        return job_id

    def _compile_output(
        self, errors: list[ManifestError], line: int, text: str
    ) -> OutputTemplate | None:
        try:
            return compile_output(text.strip())  # a stray space would name a folder " x"
        except ValueError as exc:
            self.error(errors, line, "output", str(exc))
            return None

    def _warn(self, line: int, length: int, model: str, limit: int) -> None:
        self.warning_count += 1
        if len(self.warnings) < self.max_warnings:
            message = f"{length} characters; {model} uses only the first {limit}"
            self.warnings.append(ManifestError(self.path, line, "prompt", message))
