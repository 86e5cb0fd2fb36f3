"""Reading the first answer token as a choice: one token per choice, or all spellings merged.

The model here puts its mass on "Yes" and "No" (capitalised), with the lowercase tokens that
mechlora writes after the prompt far behind and ordered the other way: the `first` reading
must say "no", the `merged` reading "yes", and every number must equal a direct computation
from the full-vocabulary logits.
"""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

from mechlora.data import QuestionGroup, Variant
from mechlora.evaluate import BASE, evaluate
from mechlora.localize import clean_run
from mechlora.loss import consistency_loss
from mechlora.models import wrap
from mechlora.models.choices import ChoiceTokens
from mechlora.models.tokenizer import GEMMA_CHAT_TEMPLATE, SPECIAL_TOKENS
from mechlora.probes import Site
from mechlora.train import TrainConfig, train

# "▁" marks a word that follows a space, as in Gemma's SentencePiece vocabulary.
WORDS = ["\n", "yes", "▁yes", "Yes", "▁Yes", "YES", "no", "▁no", "No", "▁No", "NO",
         "user", "model", "is", "▁the", "▁sky", "▁blue", "▁grass", "▁green", "?"]
LOGITS = {"Yes": 5.0, "No": 4.0, "no": 2.0, "yes": 1.0}


def spelling_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")])
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                  pad_token="<pad>", unk_token="<unk>", padding_side="left")
    tok.chat_template = GEMMA_CHAT_TEMPLATE
    return tok


class Fixed(nn.Module):
    """A final norm that outputs one fixed vector (and a trace of its input, so that a LoRA
    below still gets a gradient): every prompt gets the same logits."""

    def __init__(self, u: torch.Tensor):
        super().__init__()
        self.register_buffer("u", u)

    def forward(self, x):
        return self.u + 1e-5 * x


def spelling_model(logits: dict[str, float]):
    """A tiny Gemma 3 whose last-position logits are `logits` (0 for every other token)."""
    tok = spelling_tokenizer()
    cfg = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    u = torch.randn(cfg.hidden_size)
    model.model.norm = Fixed(u)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        for token, value in logits.items():
            model.lm_head.weight[tok.convert_tokens_to_ids(token)] = value * u / u.dot(u)
    return wrap(model, tok, name="spellings")


@pytest.fixture(scope="module")
def subject():
    return spelling_model(LOGITS)


def groups() -> list[QuestionGroup]:
    return [QuestionGroup("sky", (Variant("is the sky blue?"), Variant("is the sky blue ?", "x")),
                          "yes"),
            QuestionGroup("grass", (Variant("is the grass green?"),
                                    Variant("is the grass green ?", "x")), "no")]


def full_logits(subject, text: str) -> torch.Tensor:
    with torch.no_grad():
        return subject.model(**subject.encode([text]), logits_to_keep=1).logits[0, -1].float()


def ids(subject, *tokens: str) -> set[int]:
    return set(subject.tokenizer.convert_tokens_to_ids(list(tokens)))


def test_the_model_is_what_the_tests_assume(subject):
    z = full_logits(subject, "is the grass green?")
    for token, value in LOGITS.items():
        assert float(z[subject.tokenizer.convert_tokens_to_ids(token)]) == pytest.approx(value,
                                                                                         abs=1e-2)


def test_merged_reading_collects_the_single_token_spellings(subject):
    first = subject.choice_tokens(("yes", "no"))
    assert first.reading == "first" and first.ids == ((ids(subject, "yes").pop(),),
                                                      (ids(subject, "no").pop(),))
    merged = subject.choice_tokens(("yes", "no"), merge=True)
    assert merged.reading == "merged"
    assert merged.ids[0][0] == first.ids[0][0]  # the canonical token stays first
    assert set(merged.ids[0]) == ids(subject, "yes", "▁yes", "Yes", "▁Yes", "YES")
    # " NO" is not in the vocabulary: <unk> is a single token, but not a spelling of "no"
    assert set(merged.ids[1]) == ids(subject, "no", "▁no", "No", "▁No", "NO")


def test_a_spelling_two_choices_share_counts_for_neither():
    tokens = ChoiceTokens(((1, 3), (2, 3)), "merged")
    assert tokens.flat == [1, 3, 2]
    assert tokens.on([10, 11, 12]).ids == ((10, 11), (12, 11))


def test_eval_answers_by_the_reading_asked_for(subject):
    direct = full_logits(subject, "is the sky blue?")
    p = torch.softmax(direct, -1)
    yes = sorted(ids(subject, "yes", "▁yes", "Yes", "▁Yes", "YES"))
    no = sorted(ids(subject, "no", "▁no", "No", "▁No", "NO"))
    for merge, said in ((False, "no"), (True, "yes")):
        result = evaluate(subject, groups(), progress=False, n_boot=10, merge_variants=merge)
        assert {r["pred_choice"] for r in result.records} == {said}
        sky = next(r for r in result.records if r["group_id"] == "sky" and r["variant"] == 0)
        if merge:
            want_margin = torch.logsumexp(direct[yes], 0) - torch.logsumexp(direct[no], 0)
            want_mass = p[yes + no].sum()
        else:
            y, n = subject.answer_token_ids(("yes", "no"))
            want_margin, want_mass = direct[y] - direct[n], p[[y, n]].sum()
        assert sky["margin"] == pytest.approx(float(want_margin), abs=1e-4)
        assert sky["choice_mass"] == pytest.approx(float(want_mass), abs=1e-5)
        assert result.settings["choice_reading"] == ("merged" if merge else "first")
        assert result.metrics[BASE]["choice_mass"]["value"] == pytest.approx(float(want_mass),
                                                                             abs=1e-4)


def test_low_choice_mass_is_noted():
    chatty = spelling_model({**LOGITS, "▁the": 12.0})  # the model wants to say something else
    result = evaluate(chatty, groups(), progress=False, n_boot=10)
    mass = result.metrics[BASE]["choice_mass"]
    assert mass["value"] < 0.01 and mass["share_low"] == 1.0
    assert any("not answering in the format asked" in n for n in result.notes)
    quiet = evaluate(spelling_model(LOGITS), groups(), progress=False, n_boot=10,
                     merge_variants=True)
    assert not any("format asked" in n for n in quiet.notes)


def test_localize_margins_follow_the_reading(subject):
    z = full_logits(subject, "is the sky blue?")
    for merge in (False, True):
        tokens = subject.choice_tokens(("yes", "no"), merge=merge)
        with torch.no_grad():
            run = clean_run(subject, "is the sky blue?", None, 0, tokens, [Site(0, "resid")],
                            "last")
        want = torch.logsumexp(z[list(tokens.ids[0])], 0) - torch.logsumexp(
            z[list(tokens.ids[1])], 0)
        assert run.margin == pytest.approx(float(want), abs=1e-4)
        assert run.pred == (0 if merge else 1)


def test_merged_loss_is_the_summed_probability():
    torch.manual_seed(0)
    za, zb = torch.randn(2, 12), torch.randn(2, 12)
    yes, no = (1, 4, 7), (2, 5)
    choices = [ChoiceTokens((yes, no), "merged")] * 2
    terms = consistency_loss(za, zb, [yes, no], choices, kl_over="choices")
    pa, pb = torch.softmax(za, -1), torch.softmax(zb, -1)
    want_ce = -(torch.log(pa[0, list(yes)].sum()) + torch.log(pb[0, list(yes)].sum())) / 2
    assert float(terms.ce[0]) == pytest.approx(float(want_ce), abs=1e-5)
    want_ce1 = -(torch.log(pa[1, list(no)].sum()) + torch.log(pb[1, list(no)].sum())) / 2
    assert float(terms.ce[1]) == pytest.approx(float(want_ce1), abs=1e-5)
    qa = torch.stack([pa[0, list(yes)].sum(), pa[0, list(no)].sum()])
    qb = torch.stack([pb[0, list(yes)].sum(), pb[0, list(no)].sum()])
    qa, qb = qa / qa.sum(), qb / qb.sum()
    want_kl = ((qa * (qa / qb).log()).sum() + (qb * (qb / qa).log()).sum()) / 2
    assert float(terms.kl[0]) == pytest.approx(float(want_kl), abs=1e-5)
    # One token per answer: the plain cross-entropy, as before.
    plain = consistency_loss(za, zb, torch.tensor([1, 2]))
    want = (torch.nn.functional.cross_entropy(za, torch.tensor([1, 2]), reduction="none")
            + torch.nn.functional.cross_entropy(zb, torch.tensor([1, 2]), reduction="none")) / 2
    assert torch.allclose(plain.ce, want, atol=1e-6)


def test_training_reads_the_answer_the_same_way(tmp_path):
    subject = spelling_model(LOGITS)
    z = full_logits(subject, "is the sky blue?")
    p = torch.softmax(z, -1)
    yes = sorted(ids(subject, "yes", "▁yes", "Yes", "▁Yes", "YES"))
    no = sorted(ids(subject, "no", "▁no", "No", "▁No", "NO"))
    cfg = TrainConfig(max_steps=1, grad_accum=2, save_every=0, merge_variants=True)
    run = train(subject, groups(), layers="all", out=tmp_path / "a", config=cfg, progress=False)
    first = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[0])
    # LoRA starts as the identity (B = 0): the first CE is the base model's, on both answers.
    want = -(torch.log(p[yes].sum()) + torch.log(p[no].sum())) / 2
    assert first["ce"] == pytest.approx(float(want), abs=1e-3)
    assert run.record["config"]["merge_variants"] is True


def test_the_low_mass_threshold_is_the_users():
    chatty = spelling_model({**LOGITS, "▁the": 6.0})
    strict = evaluate(chatty, groups(), progress=False, n_boot=10, merge_variants=True)
    mass = strict.metrics[BASE]["choice_mass"]["value"]
    assert 0.1 < mass < 0.5 and any("format asked" in n for n in strict.notes)
    lenient = evaluate(chatty, groups(), progress=False, n_boot=10, merge_variants=True,
                       low_choice_mass=0.1)
    assert not any("format asked" in n for n in lenient.notes)
    assert lenient.metrics[BASE]["choice_mass"]["share_low"] == 0.0
    assert lenient.settings["low_choice_mass"] == 0.1
