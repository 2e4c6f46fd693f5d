"""The teach loop against a real CPU vLLM server (``-m vllm``): rollback, distillation, dreaming.

One server for the module: a tiny Llama whose input embeddings *and* output rows of ten words
(tiny.CONCEPT_WORDS["alpha"]) carry a planted direction d, and a readout whose ``calm`` vector
is d at both readout layers (mean 0, std 1: z = raw). Steering along calm therefore raises the
planted words' logits (the model writes them) and the readout (the added vector, and the
planted words read back as calm); distilling the steering must make the *unsteered* model read
as calm on prompts it never trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import serve as sh
from helpers import tiny
from amygdala.cli.main import main
from amygdala.readout import Readout
from amygdala.teach.client import Server, ServerError
from amygdala.teach.distill import DistillConfig, distill, prepare, train_prepared
from amygdala.teach.judge import competence, served_competence, served_scorer
from amygdala.teach.dream import DreamConfig, dream
from amygdala.teach.runs import read_prompts, run_jobs
from amygdala.teach.samples import read_samples
from amygdala.teach.tokens import Encoder

vllm = pytest.mark.vllm
KEY = "teach-key-3"
PLANT = 6.0


def planted_model(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sh.make_tiny_model(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    d = tiny.random_unit(sh.HIDDEN, 7)
    ids = tok.convert_tokens_to_ids(tiny.CONCEPT_WORDS["alpha"])
    with torch.no_grad():
        model.get_input_embeddings().weight[ids] += PLANT * d
        model.get_output_embeddings().weight[ids] += PLANT * d
    model.save_pretrained(path)
    return d


def planted_readout(path: Path, d: torch.Tensor) -> Path:
    g = torch.Generator().manual_seed(1)
    vectors = {l: torch.nn.functional.normalize(torch.randn(len(sh.CONCEPTS), sh.HIDDEN, generator=g), dim=1) for l in sh.LAYERS}
    for l in sh.LAYERS:
        vectors[l][sh.CONCEPTS.index("calm")] = d
    zeros = {l: torch.zeros(len(sh.CONCEPTS)) for l in sh.LAYERS}
    ones = {l: torch.ones(len(sh.CONCEPTS)) for l in sh.LAYERS}
    Readout(list(sh.CONCEPTS), list(sh.LAYERS), vectors, zeros, ones,
            meta={"model": {"name": "tiny-llama", "num_layers": sh.NUM_LAYERS}, "method": "planted"}).save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("teach")
    d = planted_model(root / "model")
    readout = planted_readout(root / "readout", d)
    (root / "train.txt").write_text("\n".join(sh.prompt_words(8, seed=i) for i in range(16)) + "\n" +
                                    "\n".join(sh.prompt_words(8, seed=100 + i) for i in range(8)) + "\n")
    (root / "neutral.txt").write_text("\n".join(sh.prompt_words(20, seed=200 + i) for i in range(4)) + "\n")
    return root, root / "model", readout


@pytest.fixture(scope="module")
def server(files):
    pytest.importorskip("vllm")
    root, model, readout = files
    env = sh.server_env(readout, AMYGDALA_API_KEY=KEY, AMYGDALA_SYNC_DELAY="3600", AMYGDALA_TRAIN_THREADS="1")
    s = sh.start_server(model, root / "server.log", env=env, timeout=420)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture()
def client(server):
    return Server(f"http://127.0.0.1:{server.port}", KEY)


def greedy(client: Server, prompt: list[int], n: int = 8):
    g = client.generate(prompt, n)[0]
    return g.token_ids, g.rows


@vllm
def test_served_competence_matches_torch_on_the_same_weights(client, files):
    """The server path (vLLM's prompt log-probs and ranks) against the log-likelihood computed directly with torch."""
    from transformers import AutoModelForCausalLM

    root, model_dir, _ = files
    encoder = Encoder.load(model_dir)
    texts = (root / "neutral.txt").read_text().splitlines()
    ids_of = {t: list(encoder.tokenizer(t)["input_ids"]) for t in texts}
    prompt = ids_of[texts[0]][:6]
    ids_of["greedy"] = prompt + client.generate(prompt, 10, readout=False)[0].token_ids  # 10 top-1 tokens by construction
    got = competence(served_scorer(client), ids_of.__getitem__, list(ids_of))
    assert served_competence(client, encoder, texts) == competence(served_scorer(client), ids_of.__getitem__, texts)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, hits, n = 0.0, 0, 0
    for key in ids_of:
        ids = torch.tensor([ids_of[key]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        target = ids[0, 1:]
        total += float(logp[torch.arange(len(target)), target].sum())
        hits += int((logp.argmax(-1) == target).sum())
        n += len(target)
    assert (got.texts, got.tokens) == (len(texts) + 1, n)
    assert got.mean_loglik == pytest.approx(total / n, abs=1e-3)
    assert abs(got.accuracy * n - hits) <= 1  # at most one near-tie ranked differently by the two float32 paths
    assert got.accuracy * n >= 9  # the greedy tokens are the model's top-1 (one spare for a near-tie)


@vllm
def test_rollback_restores_the_served_weights_bit_for_bit(client, files):
    root, model, _ = files
    original = (model / "model.safetensors").read_bytes()
    prompt = [2, 10, 11, 12, 13]
    before = greedy(client, prompt)
    with pytest.raises(ServerError, match="HTTP 409: no snapshot 'snap-nope'"):
        client.rollback("snap-nope")
    with pytest.raises(ServerError, match="HTTP 401"):
        Server(client.root, "wrong").snapshot()
    snap = client.snapshot()
    assert snap["tensors"] > 0 and snap["bytes"] > 0
    jobs = client.status()["jobs"]
    sample = {"context_ids": prompt, "continuation_ids": [40, 41, 42, 43, 44, 45, 46, 47]}
    client.train({"samples": [sample], "config": {"learning_rate": 1e-2, "steps": 15}})
    run_jobs(client, [sample], {"learning_rate": 1e-2, "steps": 5}, progress=False)  # queued behind the first
    assert client.status()["jobs"] == jobs + 2
    trained = greedy(client, prompt)
    assert trained[0] == [40, 41, 42, 43, 44, 45, 46, 47] != before[0]
    assert client.checkpoint()["tensors_changed"] > 0
    assert (model / "model.safetensors").read_bytes() != original

    r = client.rollback(snap["snapshot"])
    assert r["tensors_restored"] == snap["tensors"] and r["prefix_cache_reset"]
    assert greedy(client, prompt) == before  # served at once: same tokens, same readout rows
    assert client.status()["sync"]["unsynced_changes"]
    sync = client.checkpoint()
    assert sync["tensors_changed"] > 0
    assert (model / "model.safetensors").read_bytes() == original  # every restored block written back, bit for bit


@vllm
def test_distill_moves_the_unsteered_readout_on_heldout_prompts_by_half_the_gap(client, files):
    root, model, _ = files
    encoder = Encoder.load(model)
    snap = client.snapshot()["snapshot"]
    prompts = read_prompts(root / "train.txt")
    neutral = (root / "neutral.txt").read_text().splitlines()
    cfg = DistillConfig({"calm": 4.0}, max_tokens=12, heldout=8 / 24, objective="orpo", learning_rate=3e-3, steps=40)
    report = distill(client, encoder, prompts, cfg, neutral=neutral, competence_texts=neutral, progress=False)
    print(report.table())
    assert report.competence_before.tokens == report.competence_after.tokens == 80  # 4 texts of 20 words after BOS
    assert report.competence_before != report.competence_after  # measured again after training
    assert report.judges["calm"].sign == 1 and "VADER" in report.table()
    assert (report.train_prompts, report.heldout_prompts) == (16, 8) and report.pairs >= 8
    gap = report.steered["calm"] - report.before["calm"]
    assert gap > 2.0  # the steering moves the readout (it adds 4 at layer 1 and 8 at layer 2, plus the words)
    assert report.after["calm"] - report.before["calm"] >= 0.5 * gap, report.table()
    assert report.jobs[0].losses[-1] < report.jobs[0].losses[0]
    assert report.ppl_before > 1 and report.ppl_after > 1
    client.rollback(snap)
    again = distill(client, encoder, prompts, DistillConfig({"calm": 4.0}, max_tokens=12, heldout=8 / 24, submit=False),
                    competence_texts=neutral, progress=False)
    assert again.before == report.before and again.competence_before == report.competence_before  # rolled back: the unsteered model reads as before


@vllm
def test_one_prepared_set_of_pairs_trains_twice_from_the_same_weights(client, files):
    """What ``bench teach --sweep`` relies on: the pairs and before figures are taken once, each
    training (rolled back after) gets its own report, and the prepared one is left as it was."""
    root, model, _ = files
    encoder = Encoder.load(model)
    prompts = read_prompts(root / "train.txt")
    neutral = (root / "neutral.txt").read_text().splitlines()
    base = DistillConfig({"calm": 4.0}, max_tokens=12, heldout=8 / 24)
    prep = prepare(client, encoder, prompts, base, neutral=neutral, competence_texts=neutral, progress=False)
    assert prep.report.pairs == len(prep.body) >= 8 and len(prep.held) == 8
    reports = []
    for objective in ("sft", "orpo"):
        snap = client.snapshot()["snapshot"]
        cfg = DistillConfig({"calm": 4.0}, max_tokens=12, heldout=8 / 24, objective=objective, learning_rate=3e-3, steps=2)
        reports.append(train_prepared(client, encoder, prep, cfg, progress=False))
        client.rollback(snap)
    for r in reports:
        assert r.before == prep.report.before and r.competence_before == prep.report.competence_before
        assert len(r.jobs) == 1 and len(r.jobs[0].losses) == 2 and r.competence_after is not None
        assert r.competence_after != r.competence_before and r.ppl_after != r.ppl_before  # measured again, after training
    assert reports[0].jobs[0].losses[0] != reports[1].jobs[0].losses[0]  # sft and orpo losses differ on the same pairs
    assert prep.report.jobs == [] and prep.report.after == {} and prep.report.competence_after is None  # untouched
    again = prepare(client, encoder, prompts, base, neutral=neutral, competence_texts=neutral, progress=False)
    assert again.report.before == prep.report.before and again.body == prep.body  # rolled back: the same pairs again


@vllm
def test_dream_writes_triplets_whose_chosen_scores_above_the_rejected(client, files, tmp_path, capsys):
    root, model, _ = files
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(sh.prompt_words(6, seed=300 + i) for i in range(4)) + "\n")
    out = tmp_path / "dream.jsonl"
    jobs = client.status()["jobs"]
    assert main(["dream", "--server", client.root, "--prompts", str(prompts), "--toward", "calm=1", "--away", "angry=0.5",
                 "--samples", "3", "--temperatures", "0.8,1.6", "--max-tokens", "8", "--min-gap", "0.2", "--out", str(out),
                 "--quiet"]) == 0
    assert client.status()["jobs"] == jobs  # no --submit: nothing trained
    samples = read_samples(out)
    assert samples and len(samples) % 2 == 0
    for s in samples:
        direction, rest = s.source.split(":", 2)[1:]
        chosen, rejected = (float(part.split()[1]) for part in rest.split(","))
        assert direction in ("toward", "away")
        if direction == "toward":
            assert chosen >= rejected + 0.2 and s.context.startswith("Be calm.\n")
        else:
            assert chosen <= rejected - 0.2 and s.context.startswith("Be angry.\n")
        assert s.chosen != s.rejected and set(s.scores) == {"calm", "angry"}

    encoder = Encoder.load(model)
    result = dream(client, encoder, read_prompts(prompts), DreamConfig({"calm": 1.0}, samples=3, temperatures=(0.8, 1.6),
                                                                         max_tokens=8, min_gap=0.2, one_way=True), progress=False)
    assert result.triplets
    for t in result.triplets:
        assert t.chosen_score > t.rejected_score and t.direction == "plain"
        assert t.chosen_score == pytest.approx(t.chosen_means["calm"])


@vllm
def test_teach_trains_from_a_file_and_a_bad_line_submits_nothing(client, files, tmp_path, capsys):
    root, model, _ = files
    jobs = client.status()["jobs"]
    bad = tmp_path / "bad.jsonl"
    good = {"v": 1, "context": sh.prompt_words(6, seed=1), "chosen": "al1 al2 al3 al4"}
    bad.write_text(json.dumps(good) + "\n" + json.dumps({**good, "chosen": ""}) + "\n")
    assert main(["teach", "--server", client.root, "--api-key", KEY, "--data", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: field 'chosen'" in err and client.status()["jobs"] == jobs
    data = tmp_path / "good.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps({**good, "context": sh.prompt_words(6, seed=2)}) + "\n")
    assert main(["teach", "--server", client.root, "--api-key", KEY, "--data", str(data), "--steps", "10",
                 "--learning-rate", "1e-2", "--concept", "calm", "--quiet"]) == 0
    out = capsys.readouterr().out
    lines = {line.split("  ")[0]: line.split() for line in out.splitlines()}
    before, after = (float(x) for x in lines["chosen NLL/token"][-2:])
    assert after < before and client.status()["jobs"] == jobs + 1
    snap = next(line for line in out.splitlines() if line.startswith("undo:")).split()[-1]
    assert main(["rollback", "--server", client.root, "--api-key", KEY, "--snapshot", snap]) == 0


@vllm
def test_pairs_notes_scored_by_the_served_readout(client, files, tmp_path, capsys):
    """Untagged notes: the planted words read as calm after the note's last token, filler words do not."""
    root, model, _ = files
    calm_words, filler = " ".join(tiny.CONCEPT_WORDS["alpha"][:6]), " ".join(tiny.COMMON[:6])
    notes, out = tmp_path / "notes.jsonl", tmp_path / "sft.jsonl"
    notes.write_text("\n".join(json.dumps(n) for n in [{"text": calm_words}, {"text": filler},
                                                       {"text": filler, "scores": {"calm": 9.0}}]) + "\n")
    assert main(["pairs", "notes", str(notes), "--out", str(out), "--min", "calm=3", "--score-server", client.root]) == 0
    assert "notes 3, selected 2, below threshold 1, unscored 0, scored by readout 2" in capsys.readouterr().err
    got = read_samples(out)
    assert [s.chosen for s in got] == [calm_words, filler] and got[0].scores["calm"] > 3 and got[1].scores == {"calm": 9.0}
