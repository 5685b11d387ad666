"""Adapters trained by the offline trainer, one per method, served together in one mixed batch: every request's
logits equal the trainer's own fp32 logits for the same tokens (the artifact is the whole contract)."""
import copy

import torch

from adapters.artifact import load_adapter, save_artifact
from adapters.spec import backbone_spec
from adapters.data import Tokenized
from adapters.train import FitOptions, build_method, fit
from tests.helpers import load_hf, make_hf_model, refs, run_capture, small_engine

METHODS = [
    ("lora", "lora", {"rank": 4}),
    ("pissa", "pissa", {"rank": 4}),
    ("sorsa", "sorsa", {"rank": 4}),
    ("specadapt", "specadapt", {"rank": 4}),
    ("alora", "alora", {"rank": 2, "options": {"k1": 1, "k2": 1, "rounds": 2}}),
    ("sift", "sift", {"options": {"rho": 0.05}}),
    ("para", "para", {"rank": 4}),
    ("para-last", "para", {"rank": 4, "options": {"pool": "last"}}),
    ("ia3", "ia3", {}),
]


def _examples(num, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        ids = torch.randint(4, 300, (int(torch.randint(8, 14, (1,), generator=g)),), generator=g).tolist()
        p = int(torch.randint(3, 7, (1,), generator=g))
        out.append(Tokenized(ids, [-100] * p + ids[p:], p))
    return out


def test_every_trained_method_is_served_exactly(tmp_path):
    torch.set_num_threads(1)  # tiny models: one thread is far faster on a busy 2-core machine
    path = make_hf_model(tmp_path / "base", "llama")
    base = load_hf(path)
    spec = backbone_spec(base.config)
    train, evals = _examples(16, 1), _examples(4, 2)
    trained, adapters = {}, {}
    for case, name, kwargs in METHODS:
        torch.manual_seed(0)
        model = copy.deepcopy(base)
        method = build_method(name, model, **kwargs)
        fit(model, method, train, evals, 0, FitOptions(lr=2e-2, max_steps=4, batch_size=4, progress=False, eval_every=100))
        save_artifact(tmp_path / case, method.export(), method=name, spec=spec)
        adapters[case] = load_adapter(tmp_path / case, spec).deltas
        trained[case] = (model, method)

    engine = small_engine(path, max_prefill_chunk=8)
    gen = torch.Generator().manual_seed(5)
    plan = [("base", None)] + [(f"r-{case}", case) for case, _, _ in METHODS]
    prompts = {rid: torch.randint(4, 300, (int(torch.randint(3, 20, (1,), generator=gen)),), generator=gen).tolist()
               for rid, _ in plan}
    which = dict(plan)
    generated, logits = run_capture(engine, prompts, refs(which, adapters), max_tokens=8, join_after={"r-para-last": 2})
    for rid, case in plan:
        prompt = prompts[rid]
        ids = torch.tensor([prompt + generated[rid]])
        with torch.no_grad():
            if case is None:
                ref = base(ids).logits[0]
            else:
                model, method = trained[case]
                mask = torch.zeros_like(ids, dtype=torch.bool)
                mask[:, : len(prompt)] = True
                batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "prompt_mask": mask,
                         "prompt_lens": torch.tensor([len(prompt)])}
                ref = model(input_ids=ids, attention_mask=batch["attention_mask"], **method.forward_kwargs(batch)).logits[0]
        ref = ref[len(prompt) - 1 : len(prompt) - 1 + len(generated[rid])]
        ours = torch.stack(logits[rid])
        assert (ours - ref).abs().max().item() <= 1e-4, rid
        if case is not None:
            base_ref = base(ids).logits[0][len(prompt) - 1 : len(prompt) - 1 + len(generated[rid])]
            assert (ours - base_ref).abs().max().item() > 1e-4, f"{rid}: training changed nothing"
