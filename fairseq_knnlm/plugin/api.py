"""The Python API: ``from fairseq_knnlm import KNNLM``.

    lm = KNNLM.from_pretrained("runs/wikitext2/checkpoints", "checkpoint_best.pt",
                               data_name_or_path="../data-bin", dstore="runs/.../dstore/train",
                               index="runs/.../dstore/train.index", k=1024, lmbda=0.25,
                               temp=1.0, tokens_per_sample=512, context_window=256)
    lm.score(["some text", ...])     # fairseq-eval-lm --knnlm's numbers for that text
    lm.sample("a prompt", sampling=True, sampling_topp=0.9, max_len_b=64)
    lm.generate([tokens], beam=5)    # fairseq's hub interface, every step kNN-LM
    lm.neighbours("some text", 3)    # what knnlm-explain shows for token 3

Every method goes through the same code as the command line: ``score`` and ``neighbours``
run fairseq-eval-lm's own pass (``knnlm_main``) on the text, binarized with the model's
dictionary as fairseq-preprocess does, with the flags given here, so their numbers are
eval-lm's to the printed digit (the datastore and index are opened for each call);
``sample``/``generate`` are fairseq's ``GeneratorHubInterface`` over a model whose steps are
kNN-LM steps (generation.py). Any other kNN-LM flag is a keyword by its dataclass name
(``knn_pointers=True``, ``knn_cache=True``, ``knn_lambda_model="lam.npz"``, ``probe=8``,
``knn_sim_func="faiss_l2"``, ...); every flag is checked before anything is loaded.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from fairseq_knnlm.errors import FlagError, KNNLMError
from fairseq_knnlm.plugin.generation import KNNGeneration, check_prompts, loading_checkpoint

logger = logging.getLogger(__name__)

TEXT_SPLIT = "text"
USER_DIR = str(Path(__file__).resolve().parents[1])


def _flag_argv(options: dict[str, Any]) -> list[str]:
    """--flag value pairs of keyword options (True: the flag alone; False/None: left out)."""
    out: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            out.append(flag)
        else:
            out += [flag, str(value)]
    return out


@dataclass
class SentenceScore:
    """One scored sentence (a line; eval-lm scores its words and the eos that ends it)."""

    tokens: torch.Tensor  # (n,) token ids, the eos last
    words: list[str]
    positional_scores: torch.Tensor  # (n,) float32 log p (nats) that eval-lm scores
    lm_scores: torch.Tensor  # (n,) log p_LM
    knn_scores: Optional[torch.Tensor]  # (n,) log p_kNN (None without --knnlm)


@dataclass
class Scores:
    """What ``KNNLM.score`` returns: eval-lm's loss (base 2) and perplexity of the whole text
    (as fairseq-eval-lm prints them: ``Perplexity: {perplexity:.2f}``), and per sentence."""

    loss: float
    perplexity: float
    sentences: list[SentenceScore]

    def __getitem__(self, i: int) -> SentenceScore:
        return self.sentences[i]

    def __len__(self) -> int:
        return len(self.sentences)


class _ScoreCollector:
    """Runtime observer: each scored token's numbers by stream position."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, ...]] = []

    def __call__(self, b: Any) -> None:  # plugin.batch.ScoredBatch
        def arr(t: Optional[torch.Tensor]) -> np.ndarray:
            return (np.full(len(b.positions), np.nan, np.float32) if t is None
                    else t.detach().float().cpu().numpy())

        self.parts.append((np.asarray(b.positions), b.targets.cpu().numpy(), arr(b.final_logp),
                           arr(b.lm_logp), arr(b.knn_logp)))

    def by_position(self) -> tuple[np.ndarray, ...]:
        cols = [np.concatenate([p[i] for p in self.parts]) for i in range(5)]
        order = np.argsort(cols[0], kind="stable")
        return tuple(c[order] for c in cols)


class KNNLM:
    """A fairseq Transformer LM with a kNN-LM datastore, for Python."""

    def __init__(self, checkpoint: str, data: str, options: dict[str, Any],
                 eval_options: dict[str, Any], hub: Any, generation: Optional[KNNGeneration]
                 ) -> None:
        self.checkpoint, self.data = checkpoint, data
        self.options, self.eval_options = options, eval_options
        self.hub = hub
        self.task = hub.task
        self.model = hub.models[0]
        self.knn_generation = generation
        self.dictionary = self.task.target_dictionary

    # ---- loading ----
    @classmethod
    def from_pretrained(cls, model_name_or_path: Union[str, Path],
                        checkpoint_file: str = "checkpoint_best.pt",
                        data_name_or_path: Union[str, Path] = ".",
                        dstore: Optional[Union[str, Path]] = None,
                        index: Optional[Union[str, Path]] = None, k: int = 1024,
                        lmbda: float = 0.25, temp: float = 1.0,
                        tokens_per_sample: Optional[int] = None, context_window: int = 0,
                        max_tokens: int = 4096, cpu: Optional[bool] = None,
                        knnlm: bool = True, **options: Any) -> KNNLM:
        """Load the checkpoint ``model_name_or_path/checkpoint_file`` with the dictionary
        of ``data_name_or_path`` (relative to the model directory unless it exists as given)
        and the datastore ``dstore`` with its FAISS ``index``. ``tokens_per_sample`` and
        ``context_window`` are eval-lm's windowing for ``score``/``neighbours`` (default: the
        model's positions, no context window); ``options``: any other kNN-LM flag by its
        dataclass name. ``knnlm=False`` gives the plain LM (with ``knn_cache=True``: the
        cache alone)."""
        from fairseq import options as fairseq_options
        from fairseq import tasks
        from fairseq.dataclass.utils import convert_namespace_to_omegaconf
        from fairseq.hub_utils import GeneratorHubInterface

        import fairseq_knnlm  # noqa: F401  (registers the task)
        from fairseq_knnlm.flags import check_flags

        model_dir = Path(model_name_or_path)
        ckpt = Path(checkpoint_file)
        ckpt = ckpt if ckpt.is_absolute() or ckpt.exists() else model_dir / ckpt
        if not ckpt.is_file():
            raise KNNLMError(f"checkpoint {ckpt}: no such file")
        data = Path(data_name_or_path)
        data = data if data.is_absolute() or (data / "dict.txt").is_file() else model_dir / data
        if not (data / "dict.txt").is_file():
            raise KNNLMError(f"data_name_or_path {data}: no dict.txt (the model's dictionary)")
        if cpu is None:
            cpu = not torch.cuda.is_available()
        opts: dict[str, Any] = {"knnlm": knnlm, "dstore_filename": dstore, "indexfile": index,
                                "k": k, "lmbda": lmbda, "knn_temp": temp, **options}
        if not knnlm:
            opts = {n: v for n, v in opts.items() if n not in (
                "dstore_filename", "indexfile", "k", "lmbda", "knn_temp")}
        argv = [str(data), "--task", "language_modeling", "--path", str(ckpt), "--user-dir",
                USER_DIR, *(["--cpu"] if cpu else []), *_flag_argv(opts)]
        parser = fairseq_options.get_interactive_generation_parser()
        try:
            args = fairseq_options.parse_args_and_arch(parser, argv)
        except SystemExit:
            raise FlagError(f"KNNLM.from_pretrained: fairseq refused the options "
                            f"{_flag_argv(opts)} (see the message above)") from None
        cfg = convert_namespace_to_omegaconf(args)
        check_flags(cfg.task)  # before anything is opened
        task = tasks.setup_task(cfg.task)
        from fairseq import checkpoint_utils

        with loading_checkpoint(str(ckpt)):
            models, _ = checkpoint_utils.load_model_ensemble([str(ckpt)], task=task)
        model = models[0]
        if not cpu:
            model.cuda()
        hub = GeneratorHubInterface(cfg, task, models)
        gen = getattr(task, "knn_generation", None)
        mp = model.max_positions()
        eval_options = {"tokens_per_sample": tokens_per_sample or int(mp),
                        "context_window": context_window, "max_tokens": max_tokens,
                        "sample_break_mode": "none", "num_workers": 0}
        if cpu:
            eval_options["cpu"] = True
        return cls(str(ckpt), str(data), opts, eval_options, hub, gen)

    @property
    def max_positions(self) -> int:
        return int(self.model.max_positions())

    # ---- text <-> tokens ----
    def encode(self, sentence: str) -> torch.Tensor:
        """Token ids of a sentence as fairseq's hub encodes it (the eos last)."""
        return self.hub.encode(sentence)

    def decode(self, tokens: torch.Tensor) -> str:
        return self.hub.decode(tokens)

    # ---- generation ----
    def check_prompts(self, tokenized: Sequence[torch.Tensor],
                      sentences: Optional[Sequence[str]] = None) -> None:
        """Refuse an empty prompt or one longer than the model's positions (one line each),
        and say once which words are not in the dictionary (mapped to <unk>)."""
        d = self.dictionary
        prompts = [t[:-1] if t.numel() and int(t[-1]) == d.eos() else t for t in tokenized]
        unknown = None
        if sentences is not None:
            unknown = [[w for w in s.split() if d.index(w) == d.unk_index and w != d.unk_word]
                       for s in sentences]

        def what(i: int) -> str:
            return (f"prompt {sentences[i][:40]!r}" if sentences is not None
                    else f"prompt {i + 1}")

        check_prompts(prompts, d.unk(), self.max_positions, what, unknown)

    def generate(self, tokenized: Union[torch.Tensor, Sequence[torch.Tensor]], beam: int = 1,
                 verbose: bool = False, seed: Optional[int] = None, knn: bool = True,
                 score_prompt: bool = True, **kwargs: Any) -> Any:
        """fairseq's ``GeneratorHubInterface.generate`` (hypotheses with tokens and
        positional scores), every step kNN-LM. ``knn=False``: the base LM (the same model,
        the kNN step switched off); ``score_prompt=False``: no kNN search at the prompt's
        forced steps (their scores are then the LM's; faster; the generated tokens are the same
        unless pointers are on, which then start at the first free step);
        ``seed``: torch's seed before generating (sampling); kwargs: generation options
        (``sampling``, ``sampling_topk``, ``sampling_topp``, ``temperature``, ``max_len_b``,
        ``min_len``, ...)."""
        single = torch.is_tensor(tokenized) and tokenized.dim() == 1
        batch = [tokenized] if single else list(tokenized)
        if not kwargs.pop("_checked", False):
            self.check_prompts(batch)
        if seed is not None:
            from fairseq import utils

            utils.set_torch_seed(seed)
        gen = self.knn_generation
        before = (gen.enabled, gen.score_prefix) if gen is not None else None
        try:
            if gen is not None:
                gen.enabled, gen.score_prefix = knn, score_prompt
            out = self.hub.generate(batch, beam=beam, verbose=verbose, **kwargs)
        finally:
            if gen is not None and before is not None:
                gen.enabled, gen.score_prefix = before
        return out[0] if single else out

    def sample(self, sentences: Union[str, Sequence[str]], beam: int = 1,
               verbose: bool = False, **kwargs: Any) -> Union[str, list[str]]:
        """Continue each prompt (fairseq's hub ``sample``: the prompt and its continuation,
        as text)."""
        if isinstance(sentences, str):
            return self.sample([sentences], beam=beam, verbose=verbose, **kwargs)[0]
        tokenized = [self.encode(s) for s in sentences]
        self.check_prompts(tokenized, sentences)
        hypos = self.generate(tokenized, beam=beam, verbose=verbose, _checked=True, **kwargs)
        return [self.decode(h[0]["tokens"]) for h in hypos]

    # ---- scoring and explaining: fairseq-eval-lm's own pass ----
    def _eval_cfg(self, data_dir: str, extra: Optional[dict[str, Any]] = None) -> Any:
        from fairseq import options as fairseq_options
        from fairseq.dataclass.utils import convert_namespace_to_omegaconf

        argv = [data_dir, "--path", self.checkpoint, "--user-dir", USER_DIR, "--gen-subset",
                TEXT_SPLIT, *_flag_argv({**self.eval_options, **(extra or {})}),
                *_flag_argv(self.options)]
        args = fairseq_options.parse_args_and_arch(fairseq_options.get_eval_lm_parser(), argv)
        args.distributed_world_size = 1
        return convert_namespace_to_omegaconf(args)

    def _run_eval(self, sentences: Sequence[str], observers: list, tmp: str) -> dict:
        from fairseq_knnlm.explain.document import binarize_text
        from fairseq_knnlm.plugin.eval_lm_patch import knnlm_main

        lines = [s.replace("\r", " ").replace("\n", " ") for s in sentences]
        if not lines or not any(line.split() for line in lines):
            raise KNNLMError("score: no text to score")
        shutil.copy(Path(self.data) / "dict.txt", Path(tmp) / "dict.txt")
        stats = binarize_text(lines, Path(self.data) / "dict.txt", Path(tmp) / TEXT_SPLIT)
        if stats["unknown"]:
            logger.warning("%d words of the text are not in the model's dictionary: scored "
                           "as <unk>", stats["unknown"])
        cfg = self._eval_cfg(tmp)
        res = knnlm_main(cfg, knn_observers=observers)
        return {k: float(v) for k, v in (res or {}).items()}

    def score(self, sentences: Union[str, Sequence[str]]) -> Scores:
        """fairseq-eval-lm --knnlm over the sentences as the lines of one text (with the
        windowing given to from_pretrained): per-token log-probabilities (nats) and the loss
        and perplexity eval-lm prints."""
        if isinstance(sentences, str):
            sentences = [sentences]
        if not self.options.get("knnlm") and not self.options.get("knn_cache"):
            raise KNNLMError("score: this KNNLM has neither --knnlm nor --knn-cache (load it "
                             "with knnlm=True)")
        obs = _ScoreCollector()
        with tempfile.TemporaryDirectory(prefix="knnlm-score-") as tmp:
            res = self._run_eval(sentences, [obs], tmp)
        pos, tgt, final, lm, knn = obs.by_position()
        if len(np.unique(pos)) != len(pos) or (len(pos) and pos[0] < 0):
            raise RuntimeError("eval-lm scored a position twice or without a position")
        eos = self.dictionary.eos()
        out, start = [], 0
        ends = np.nonzero(tgt == eos)[0]
        for e in ends:
            sl = slice(start, int(e) + 1)
            out.append(SentenceScore(
                tokens=torch.from_numpy(tgt[sl].astype(np.int64)),
                words=[self.dictionary[int(i)] for i in tgt[sl]],
                positional_scores=torch.from_numpy(final[sl]),
                lm_scores=torch.from_numpy(lm[sl]),
                knn_scores=None if np.isnan(knn[sl]).all() else torch.from_numpy(knn[sl])))
            start = int(e) + 1
        loss = res.get("loss", float("nan"))
        ppl = res.get("perplexity", float("nan"))
        return Scores(loss=loss, perplexity=ppl, sentences=out)

    def neighbours(self, text: str, position: int, top: int = 5,
                   context_tokens: int = 20) -> dict[str, Any]:
        """What knnlm-explain shows for the token at ``position`` of ``text`` (0-based in its
        token stream: the words of each line, then its eos): its log-probabilities, its
        ``top`` closest neighbours and those that carry it, with their training contexts."""
        from fairseq_knnlm.explain import document as ex
        from fairseq_knnlm.store.datastore import open_datastore

        if not self.options.get("knnlm"):
            raise KNNLMError("neighbours: this KNNLM has no datastore (knnlm=False)")
        if position < 0:
            raise FlagError(f"neighbours: position must be >= 0, got {position}")
        temp = float(self.options["knn_temp"])
        collector = ex.Collector(position, position + 1, top=top, temperature=temp)
        with tempfile.TemporaryDirectory(prefix="knnlm-explain-") as tmp:
            self._run_eval(ex.text_lines(text) or [text], [collector], tmp)
        if collector.seen <= position:
            raise FlagError(f"neighbours: position {position} is past the end of the text "
                            f"({collector.seen} tokens)")
        ds = open_datastore(self.options["dstore_filename"], load_keys=False)
        train = ex.train_text(Path(self.data), ds, context_tokens)
        doc = ex.build_doc(collector.table(), list(self.dictionary.symbols), train,
                           {"k": int(self.options["k"]), "lmbda": float(self.options["lmbda"]),
                            "knn_temp": temp})
        return doc["tokens"][0]


__all__ = ["KNNLM", "Scores", "SentenceScore"]
