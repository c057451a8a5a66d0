"""Does a checkpoint read colours from the image, or copy them from the question? (shapes data)

Two measurements on a Hugging Face LLaVA checkpoint (torch; the runtime is not involved):

- teacher-forced caption colours: the reference answer is fed in and, at every colour word of the
  CAPTION stage, the model's top token is compared with the scene's colour and with the colour the
  question names; then the question's colour word is swapped for another and the count of
  predictions that follow the swap is taken. A model that reads the image is unmoved by the swap.
- teacher-forced scan decisions (records written with `--reasoning-style scan`): at every "red? yes" /
  "red? no" of the REASONING stage, with the right caption and the right object before it, is the
  model's top token the right one? A model that compares the two words gets them all.
- a linear probe at the object-centre patches: how well the colour (and shape) can be read back
  from the tower's features and from the projector's output, and how far apart the classes' mean
  vectors lie (a projector can keep a feature linearly readable and still shrink it).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from llavao1_train.shapes.scene import COLORS, SHAPES

COLOURS = tuple(COLORS)


@dataclass
class ColourReport:
    questions: int
    plain_slots: int  # caption colour words where the question names no colour
    plain_right: int
    named_slots: int  # ... where the question names a colour
    named_right: int
    named_copied: int  # the question's colour predicted where the object has another
    named_other: int  # slots whose object has another colour than the question's
    swapped_follow: int  # after swapping the question's colour word: predictions equal to the new colour
    scan_yes: int  # scan-style reasoning steps whose answer is "yes" (0 for list-style records)
    scan_yes_right: int
    scan_no: int
    scan_no_right: int
    probe: dict  # {"tower"|"projector": {"colour_acc", "shape_acc", "colour_spread", "shape_spread"}}

    def to_json(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        lines = [f"{self.questions} questions, teacher-forced caption colours",
                 f"  question names no colour: {self.plain_right}/{self.plain_slots} right",
                 f"  question names one: {self.named_right}/{self.named_slots} right; its colour written in "
                 f"{self.named_copied} of {self.named_other} places where the object has another",
                 f"  question's colour swapped: {self.swapped_follow}/{self.named_slots} predictions follow it",
                 f"teacher-forced scan decisions: yes {self.scan_yes_right}/{self.scan_yes}, "
                 f"no {self.scan_no_right}/{self.scan_no}",
                 "linear probe at object-centre patches (held-out quarter; spread = mean distance of class means)"]
        for where, p in self.probe.items():
            lines.append(f"  {where:9s} colour {p['colour_acc']:.3f} shape {p['shape_acc']:.3f} "
                         f"colour spread {p['colour_spread']:.2f} shape spread {p['shape_spread']:.2f}")
        return "\n".join(lines)


def _question_colour(record) -> str | None:
    first = record.question.split("\n")[0]
    named = [c for c in COLOURS if re.search(rf"\b{c}\b", first)]
    return named[0] if named else None


def measure_colour(checkpoint: str | Path, records_path: str | Path, limit: int = 150, probe_images: int = 1500,
                   seed: int = 0) -> ColourReport:
    import torch
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from llavao1_edge.records import read_records, record_from_json
    from llavao1_train.data import ImageSpec, pixels_for, tokenize_record
    from llavao1_train.model import image_token_count, read_image_stats

    root = Path(records_path).parent
    recs = [r for r in read_records(records_path) if r.meta.get("scene") and "<CAPTION>" in r.answer]
    if not recs:
        raise ValueError(f"{records_path}: no shapes records with a CAPTION stage and meta.scene")
    model = LlavaForConditionalGeneration.from_pretrained(str(checkpoint)).eval()
    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    cfg = model.config
    mean, std = read_image_stats(checkpoint)
    ispec = ImageSpec(cfg.vision_config.image_size, tuple(mean), tuple(std), image_token_count(cfg))
    def word_id(word: str) -> int:  # the token a word starts with after a space, as in running text
        return tok.convert_tokens_to_ids(tok.tokenize(" " + word)[0])

    colour_of = {word_id(c): c for c in COLOURS}
    open_id, close_id = tok.convert_tokens_to_ids("<CAPTION>"), tok.convert_tokens_to_ids("</CAPTION>")
    rng = random.Random(seed)
    decision_of = {word_id(w): w for w in ("yes", "no")}
    asked = tok.convert_tokens_to_ids("?")
    n = dict(plain_slots=0, plain_right=0, named_slots=0, named_right=0, named_copied=0, named_other=0,
             swapped_follow=0, scan_yes=0, scan_yes_right=0, scan_no=0, scan_no_right=0)

    def predictions(record, count_decisions: bool = False) -> list[tuple[str, str]]:
        """(target colour, predicted colour) at caption colour words; tallies scan decisions if asked."""
        ex = tokenize_record(tok, record, ispec, 4096, cfg.image_token_id, root)
        px = torch.from_numpy(pixels_for(ex, ispec))[None]
        with torch.no_grad():
            top = model(input_ids=torch.tensor([ex.input_ids]), pixel_values=px).logits[0].argmax(-1)  # [T]
        ids = ex.input_ids
        start, end = ids.index(open_id), ids.index(close_id)
        if count_decisions:  # "? yes" / "? no" after the caption: a scan step's decision
            for i in range(end + 1, len(ids)):
                if ids[i - 1] == asked and ids[i] in decision_of:
                    n[f"scan_{decision_of[ids[i]]}"] += 1
                    n[f"scan_{decision_of[ids[i]]}_right"] += int(top[i - 1]) == ids[i]
        return [(colour_of[t], colour_of.get(int(top[i - 1]), "other"))
                for i, t in enumerate(ids) if start < i < end and t in colour_of]

    for r in recs[:limit]:
        named = _question_colour(r)
        pairs = predictions(r, count_decisions=True)
        if named is None:
            n["plain_slots"] += len(pairs)
            n["plain_right"] += sum(t == p for t, p in pairs)
            continue
        n["named_slots"] += len(pairs)
        n["named_right"] += sum(t == p for t, p in pairs)
        n["named_other"] += sum(t != named for t, _ in pairs)
        n["named_copied"] += sum(t != named and p == named for t, p in pairs)
        other = rng.choice([c for c in COLOURS if c != named])
        swapped = json.loads(json.dumps(r.to_json()))
        lines = swapped["conversations"][0]["value"].split("\n")  # "<image>", the question, options ...
        lines[1] = re.sub(rf"\b{named}\b", other, lines[1])
        swapped["conversations"][0]["value"] = "\n".join(lines)
        n["swapped_follow"] += sum(p == other for _, p in predictions(record_from_json(swapped, records_path, None, root)))
    probe = _probe(model, recs, root, ispec, probe_images, seed)
    return ColourReport(min(limit, len(recs)), **n, probe=probe)


def _probe(model, recs, root: Path, ispec, max_images: int, seed: int) -> dict:
    """Fit linear colour / shape read-outs at object-centre patches on 3/4 of the objects, score the rest."""
    import torch

    from llavao1_train.vision_pretrain import load_scenes

    pixels, scenes = load_scenes(recs, root, ispec)  # [N, 3, S, S] float16, one per distinct image
    pixels, scenes = pixels[:max_images], scenes[:max_images]
    vc = model.config.vision_config
    grid = vc.image_size // vc.patch_size
    feats: dict[str, list] = {"tower": [], "projector": []}
    colour, shape = [], []
    for i in range(0, len(scenes), 100):
        with torch.no_grad():
            h = model.model.vision_tower(pixel_values=pixels[i:i + 100].float(), output_hidden_states=True).hidden_states[
                model.config.vision_feature_layer]  # [B, P, W]
            p = model.model.multi_modal_projector(h)  # [B, P, D]
        for b, objs in enumerate(scenes[i:i + 100]):
            for o in objs:
                k = min(int(o["y"] * grid), grid - 1) * grid + min(int(o["x"] * grid), grid - 1)
                feats["tower"].append(h[b, k])
                feats["projector"].append(p[b, k])
                colour.append(COLOURS.index(o["color"]))
                shape.append(SHAPES.index(o["shape"]))
    y_colour, y_shape = torch.tensor(colour), torch.tensor(shape)
    torch.manual_seed(seed)
    out = {}
    for where, xs in feats.items():
        x = torch.stack(xs)
        out[where] = {"colour_acc": _fit(x, y_colour), "shape_acc": _fit(x, y_shape),
                      "colour_spread": _spread(x, y_colour), "shape_spread": _spread(x, y_shape)}
    return out


def _fit(x, y, steps: int = 300) -> float:
    import torch

    cut = len(y) * 3 // 4
    x = (x - x[:cut].mean(0)) / (x[:cut].std(0) + 1e-5)
    lin = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(lin.parameters(), 1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(x[:cut]), y[:cut]).backward()
        opt.step()
    with torch.no_grad():
        return round((lin(x[cut:]).argmax(-1) == y[cut:]).float().mean().item(), 4)


def _spread(x, y) -> float:
    mu = x.mean(0)
    return round(float(sum((x[y == c].mean(0) - mu).norm() for c in y.unique()) / len(y.unique())), 3)
