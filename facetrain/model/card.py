"""A model card: where a model came from and how well it verifies, as JSON and as Markdown. Torch-free.

Built from a bundle's metadata alone (`build_card(meta)`), so training, `facetrain.eval` and `facetrain.export`
produce the same card from the same facts, and a bundle written before cards existed gets one the first time it
is evaluated or exported. What the card holds:

- training data: source and folder name, identities and images of the training and validation split, the files
  the pre-flight left out (count and the first `LEFT_OUT_SHOWN` names): metadata key `data_summary`, written by
  the trainer (`data_summary`);
- the alignment recipe, backbone / embedding / loss / optimizer, pretrained weights, the teacher (metadata key
  `teacher`: {file, sha256, licence}; "none" when absent);
- the latest validation figures (`val_metrics`), every evaluation that calibrated the model (`evaluation_entry`
  of an eval report, with its 95% intervals and failures to acquire when the report has them), the calibrated
  threshold and the FAR it targets;
- intended use and known limits, derived from those facts.

Paths appear as their last component only (the data set's folder name): a card travels with the model.
"""

from __future__ import annotations

from pathlib import Path

from facetrain.config.constants import DEFAULT_TARGET_FARS

CARD_FORMAT = "facetrain-model-card"
CARD_VERSION = 1
CARD_FILE = "MODEL_CARD.md"  # inside every bundle and checkpoint, beside facetrain.json
CARD_KEY = "model_card"  # the card's JSON: in facetrain.json and in an exported file's metadata_props
LEFT_OUT_SHOWN = 5  # names of pre-flight refusals a card lists (the count is always complete)
NOT_AVAILABLE = "n/a"
DEFAULT_LEVEL = 0.95  # the confidence level an interval column is headed with when a report does not say
# the loss settings a card names (every other key of the loss section is in facetrain.json's config, which a
# given loss may ignore: loss.margin null means that loss's standard margin)
LOSS_SHOWN = ("name", "margin", "distance", "miner")

INTENDED_USE = ("1:1 face verification: decide whether two aligned face crops show the same person by comparing "
                "the cosine similarity of their embeddings with a threshold calibrated for a target false-accept "
                "rate (FAR), or rank a consented gallery of enrolled people. Not for inferring age, gender, "
                "emotion or any other attribute, and not for identifying people who did not consent to enrolment.")


def _name(path) -> str | None:
    """The last component of a local path (a folder's name), or None."""
    return Path(str(path).replace("\\", "/")).name or str(path) if path else None


# ---------------------------------------------------------------------------------------------- inputs


def data_summary(source: str, root: str, train: tuple[int, int], validation: tuple[int, int],
                 left_out: list[str], excluded: list[str] = ()) -> dict:
    """What the trainer records about its data (metadata key `data_summary`): (identities, images) per split;
    `left_out`: the files the pre-flight refused, `excluded`: those data.exclude named (paths; the card keeps
    them relative to `root`)."""
    base = Path(root) if root else None

    def relative(path: str) -> str:
        try:
            return Path(path).relative_to(base).as_posix() if base else Path(path).name
        except ValueError:
            return Path(path).name

    return {"source": source, "root": _name(root),
            "train": {"identities": int(train[0]), "images": int(train[1])},
            "validation": {"identities": int(validation[0]), "images": int(validation[1])},
            "preflight_left_out": {"count": len(left_out), "first": [relative(p) for p in left_out[:LEFT_OUT_SHOWN]]},
            "excluded": {"count": len(excluded), "first": [relative(p) for p in excluded[:LEFT_OUT_SHOWN]]}}


def _tar_at_far(metrics: dict) -> dict[str, float]:
    """{"1e-03": TAR, ...} for the FARs the metrics resolve (keys as the eval report's intervals spell them)."""
    out = {}
    for far in DEFAULT_TARGET_FARS:
        value = metrics.get(f"tar@far={far:.0e}")
        if value is not None:
            out[f"{far:.0e}"] = value
    return out


def _figures(metrics: dict) -> dict:
    return {"auc": metrics.get("auc"), "eer": metrics.get("eer"), "tar_at_far": _tar_at_far(metrics),
            "n_genuine": metrics.get("n_genuine"), "n_impostor": metrics.get("n_impostor")}


def evaluation_entry(report: dict, date: str) -> dict:
    """What a card keeps of one `facetrain.eval` report (`evaluator.run`'s dict)."""
    cal = report.get("calibration") or {}
    return {"date": date, "data": _name(report.get("data")), "pairs_file": _name(report.get("pairs_file")),
            "protocol": report.get("protocol"),
            "identities": report.get("n_identities"), "images": report.get("n_images"), "flip": report.get("flip"),
            **_figures(report.get("metrics") or {}),
            "intervals": report.get("intervals"), "failures_to_acquire": report.get("failures_to_acquire"),
            "threshold": cal.get("threshold"), "far": cal.get("far")}


# ---------------------------------------------------------------------------------------------- the card


def _pretrained(model_cfg: dict) -> str:
    if model_cfg.get("init_from"):
        return f"facetrain model {_name(model_cfg['init_from'])} (fine-tuned; its card's terms apply to this model)"
    if model_cfg.get("pretrained_file"):
        return f"file {_name(model_cfg['pretrained_file'])} (its licence applies to this model)"
    if model_cfg.get("pretrained"):
        return f"timm's pretrained {model_cfg.get('backbone')} (its licence applies to this model)"
    return "none (random initialisation)"


def _teacher(meta: dict) -> dict | str:
    teacher = meta.get("teacher")
    if not isinstance(teacher, dict):
        return "none"
    return {"file": _name(teacher.get("file")), "sha256": teacher.get("sha256"),
            "licence": teacher.get("licence") or teacher.get("license") or teacher.get("source")
            or "not recorded: find out before shipping this model"}


def _training(config: dict) -> dict:
    loss = {k: (config.get("loss") or {}).get(k) for k in LOSS_SHOWN}
    optim = config.get("optim") or {}
    train = config.get("train") or {}
    return {"loss": loss, "optimizer": {k: optim.get(k) for k in ("name", "lr", "weight_decay", "scheduler")},
            "max_steps": train.get("max_steps"), "epochs": train.get("epochs"), "seed": train.get("seed")}


def _data(meta: dict) -> dict:
    summary = meta.get("data_summary")
    if isinstance(summary, dict):
        return summary
    data = (meta.get("config") or {}).get("data") or {}
    return {"source": data.get("source"), "root": _name(data.get("root")), "train": None, "validation": None,
            "preflight_left_out": None}


def _threshold(meta: dict) -> dict | None:
    if meta.get("threshold") is None:
        return None
    cal = meta.get("threshold_calibration") or {}
    return {"value": meta["threshold"], "far": meta.get("threshold_far"), "tar": cal.get("tar"),
            "protocol": cal.get("protocol"), "data": _name(cal.get("data")), "n_impostor": cal.get("n_impostor"),
            "n_genuine": cal.get("n_genuine"), "flip": cal.get("flip"), "date": cal.get("date")}


def build_card(meta: dict, evaluation: dict | None = None) -> dict:
    """The card of a model from its metadata (bundle `facetrain.json` or decoded ONNX metadata); earlier
    evaluations come from the metadata's own card, `evaluation` (an `evaluation_entry`) is appended."""
    model = meta.get("model") or {}
    config = meta.get("config") or {}
    previous = meta.get(CARD_KEY) if isinstance(meta.get(CARD_KEY), dict) else {}
    evaluations = list(previous.get("evaluations") or []) + ([evaluation] if evaluation else [])
    card = {
        "format": CARD_FORMAT, "version": CARD_VERSION,
        "model": {"backbone": model.get("backbone"), "embedding_dim": model.get("embedding_dim"),
                  "input_size": (meta.get("preprocess") or {}).get("image_size"), "step": meta.get("step"),
                  "pretrained": _pretrained(model)},
        "data": _data(meta),
        "alignment": meta.get("alignment"),
        "training": _training(config),
        "teacher": _teacher(meta),
        "validation": _figures(meta["val_metrics"]) if isinstance(meta.get("val_metrics"), dict) else None,
        "evaluations": evaluations,
        "threshold": _threshold(meta),
        "intended_use": INTENDED_USE,
    }
    card["limits"] = known_limits(card)
    return card


# ---------------------------------------------------------------------------------------------- limits

def _limit_data(card: dict) -> list[str]:
    data = card["data"]
    if data.get("source") == "synthetic":
        out = ["synthetic training data (drawn cartoon faces): not a face model; for testing the pipeline only"]
    else:
        out = []
    if data.get("train") is None:
        out.append("training data counts not recorded (bundle written before model cards)")
    else:
        out.append(f"trained on {data['train']['identities']:,} identities ({data['train']['images']:,} images) "
                   f"from {data.get('root') or 'the ' + str(data.get('source')) + ' source'}; people, cameras "
                   "and lighting unlike these are not covered")
    left = data.get("preflight_left_out") or {}
    if left.get("count"):
        out.append(f"the pre-flight left out {left['count']:,} unreadable training file(s)")
    return out


def _limit_use(card: dict) -> list[str]:
    out = []
    if card["alignment"] is None:
        out.append("no facetrain.align recipe: inputs must be cropped and aligned the way the training images were")
    if card["teacher"] != "none" and card["teacher"]["licence"].startswith("not recorded"):
        out.append("distilled from a teacher whose licence is not recorded")
    evaluations = card["evaluations"]
    if not evaluations and card["threshold"] is not None:
        out.append("no facetrain.eval figures on this card (calibrated before model cards existed): evaluate "
                   "again to record them")
    elif not evaluations:
        out.append("not evaluated with facetrain.eval yet: the only figures are the validation split's")
    else:
        last = evaluations[-1]
        out.append(f"last evaluated on {last.get('identities') or 0:,} held-out people ({last.get('data')}, "
                   f"{last.get('n_impostor') or 0:,} impostor pairs): figures on other data will differ")
    threshold = card["threshold"]
    if threshold is None:
        out.append("no threshold calibrated yet: run python -m facetrain.eval on held-out people before deciding")
    elif threshold.get("n_impostor"):
        out.append(f"threshold calibrated on {threshold['n_impostor']:,} impostor pairs: FARs below "
                   f"{1 / threshold['n_impostor']:.0e} are not resolved")
    return out


def known_limits(card: dict) -> list[str]:
    """Honest limits, derived from the card's facts (each rule a function of the card)."""
    return [line for rule in (_limit_data, _limit_use) for line in rule(card)]


# ---------------------------------------------------------------------------------------------- Markdown


def _num(value, digits: int = 4) -> str:
    return NOT_AVAILABLE if value is None else f"{value:.{digits}f}"


def _interval(intervals: dict | None, *keys: str) -> str:
    value = intervals or {}
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(x, int | float) for x in value):
        return f"[{value[0]:.4f}, {value[1]:.4f}]"
    return NOT_AVAILABLE


def _figure_rows(figures: dict, intervals: dict | None) -> list[str]:
    rows = [f"| AUC | {_num(figures.get('auc'))} | {_interval(intervals, 'auc')} |",
            f"| EER | {_num(figures.get('eer'))} | {_interval(intervals, 'eer')} |"]
    rows += [f"| TAR at FAR {far} | {_num(tar)} | {_interval(intervals, 'tar_at_far', far)} |"
             for far, tar in (figures.get("tar_at_far") or {}).items()]
    return rows


def _table(figures: dict, intervals: dict | None, level: str) -> list[str]:
    return [f"| metric | value | {level} interval |", "| --- | ---: | --- |", *_figure_rows(figures, intervals)]


def _md_data(card: dict) -> list[str]:
    data = card["data"]
    lines = ["## Training data", "", f"Source: {data.get('source')}"
             + (f" `{data['root']}`" if data.get("root") else "") + "."]
    if data.get("train") is None:
        return lines + ["", "Identity and image counts: not recorded (bundle written before model cards)."]
    lines += ["", "| split | identities | images |", "| --- | ---: | ---: |"]
    lines += [f"| {split} | {data[split]['identities']:,} | {data[split]['images']:,} |"
              for split in ("train", "validation")]
    left = data.get("preflight_left_out") or {}
    shown = ", ".join(f"`{n}`" for n in left.get("first") or [])
    more = f" (first: {shown})" if shown else ""
    lines += ["", f"Left out by the pre-flight check: {left.get('count', 0):,} file(s){more}."]
    excluded = data.get("excluded") or {}
    if excluded.get("count"):
        shown = ", ".join(f"`{n}`" for n in excluded.get("first") or [])
        lines += ["", f"Left out by data.exclude (an audit's likely mislabels and duplicate identities): "
                  f"{excluded['count']:,} file(s) (first: {shown})."]
    return lines


def _md_model(card: dict) -> list[str]:
    model, training = card["model"], card["training"]
    loss = training["loss"]
    margin = "standard" if loss.get("margin") is None else loss["margin"]
    opt = training["optimizer"]
    teacher = card["teacher"]
    teacher_text = "none" if teacher == "none" else (
        f"`{teacher['file']}` (sha256 {teacher['sha256']}); licence / source: {teacher['licence']}")
    alignment = card["alignment"]
    align_text = "none (the training images were used as given)" if alignment is None else ", ".join(
        f"{k} {v}" for k, v in alignment.items())
    return ["## Model and training", "",
            f"- backbone: {model['backbone']}, {model['embedding_dim']}-d embedding, {model['input_size']} px input,"
            f" step {model['step']}",
            f"- pretrained weights: {model['pretrained']}",
            f"- loss: {loss.get('name')} (margin {margin}, distance {loss.get('distance')}, miner "
            f"{loss.get('miner')})",
            f"- optimizer: {opt['name']}, lr {opt['lr']}, weight decay {opt['weight_decay']}, "
            f"schedule {opt['scheduler']}",
            f"- alignment: {align_text}",
            f"- teacher: {teacher_text}"]


def _md_validation(card: dict) -> list[str]:
    val = card["validation"]
    lines = ["## Validation during training", ""]
    if val is None:
        return lines + ["No validation figures recorded (a checkpoint, not the best-model bundle)."]
    pairs = f"{val.get('n_genuine') or 0:,} genuine / {val.get('n_impostor') or 0:,} impostor pairs"
    return lines + [f"Held-out identities of the training source, {pairs}, at step {card['model']['step']}.", "",
                    *_table(val, None, f"{DEFAULT_LEVEL:.0%}")]


def _level(intervals) -> str:
    """An interval column's heading: the report's `level`, a fraction (0.95) or a percentage (95)."""
    level = intervals.get("level") if isinstance(intervals, dict) else None
    if not isinstance(level, int | float) or isinstance(level, bool) or not 0 < level < 100:
        level = DEFAULT_LEVEL
    return f"{level / 100 if level > 1 else level:.0%}"


def _md_evaluation(index: int, ev: dict) -> list[str]:
    intervals = ev.get("intervals")
    pairs = f"{ev.get('n_genuine') or 0:,} genuine / {ev.get('n_impostor') or 0:,} impostor pairs"
    pairs_file = f" (pair list {ev['pairs_file']})" if ev.get("pairs_file") else ""
    lines = [f"### {index}. {ev.get('data')} ({ev.get('date')})", "",
             f"Protocol {ev.get('protocol')}{pairs_file}: {ev.get('identities')} identities, "
             f"{ev.get('images')} images, {pairs}, flip test {'on' if ev.get('flip') else 'off'}.", "",
             *_table(ev, intervals, _level(intervals))]
    far = _interval(intervals, "delivered_far")
    if far != NOT_AVAILABLE:
        lines.append(f"| delivered FAR at the threshold | | {far} |")
    fta = ev.get("failures_to_acquire")
    lines += ["", "Failures to acquire: " + (NOT_AVAILABLE if not isinstance(fta, dict) else
                                             f"{fta.get('rate', 0):.2%} ({fta.get('count', 0):,} images)") + "."]
    return lines


def _md_evaluations(card: dict) -> list[str]:
    lines = ["## Evaluations (facetrain.eval)", ""]
    if not card["evaluations"]:
        return lines + ["None yet: `python -m facetrain.eval --model <bundle> --data <held-out people>`."]
    for i, ev in enumerate(card["evaluations"], 1):
        lines += [*_md_evaluation(i, ev), ""]
    return lines[:-1]


def _md_threshold(card: dict) -> list[str]:
    t = card["threshold"]
    lines = ["## Decision threshold", ""]
    if t is None:
        return lines + ["None calibrated yet: `facetrain.eval` writes one for a target FAR."]
    return lines + [f"Same person if cosine similarity >= {t['value']:.6f}. Target FAR {t['far']:g}, "
                    f"TAR there {_num(t.get('tar'))}; calibrated on {t.get('data')} ({t.get('protocol')}, "
                    f"{t.get('n_genuine') or 0:,} genuine / {t.get('n_impostor') or 0:,} impostor pairs, flip test "
                    f"{'on' if t.get('flip') else 'off'}) on {t.get('date')}."]


def render_markdown(card: dict) -> str:
    """The card as the `MODEL_CARD.md` a bundle holds."""
    model = card["model"]
    lines = [f"# Model card: {model['backbone']} ({model['embedding_dim']}-d face embedding)", "",
             "Written by facetrain from the model's metadata (`facetrain.json` key `model_card`); training, "
             "`facetrain.eval` and `facetrain.export` keep it up to date.", ""]
    for section in (_md_data, _md_model, _md_validation, _md_evaluations, _md_threshold):
        lines += [*section(card), ""]
    lines += ["## Intended use", "", card["intended_use"], "", "## Known limits", ""]
    lines += [f"- {limit}" for limit in card["limits"]]
    return "\n".join(lines) + "\n"
