"""The shared diffusion machinery under both families (Dream: row i-1 predicts position i; LLaDA: row i predicts
position i): the two-pass SM step, the objective, the ELBO, gate initialisation and plain decoding.

The row each position reads is written here by hand per family (``ROW``), not taken from the library, and the
"oracle" models put their answer only on the row their family's convention names: a site that used the other
family's alignment fails these tests.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from softmask_ext import SoftMask, reference
from softmask_ext.data import Example, collate
from softmask_ext.decoding import diffusion_generate
from softmask_ext.diffusion import NoiseSchedule, masked_token_loss, soft_mask_forward
from softmask_ext.evaluation.elbo import estimate_elbo
from softmask_ext.model import DreamConfig, DreamModel, LLaDAConfig, LLaDAModel, family_of
from softmask_ext.model.transformer import LMOutput, select_rows
from softmask_ext.training import masked_neg_entropy, scale_gradient

VOCAB, MASK, PAD = 64, 63, 0
FAMILIES = ("dream", "llada")
ROW = {"dream": lambda i: max(i - 1, 0), "llada": lambda i: i}  # the logits row that predicts position i
SHAPES = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rope_theta=10000.0,
    mask_token_id=MASK,
    pad_token_id=PAD,
    eos_token_id=PAD,
    bos_token_id=1,
)


def tiny_model(family: str, seed: int = 0) -> DreamModel | LLaDAModel:
    torch.manual_seed(seed)
    model = DreamModel(DreamConfig(**SHAPES)) if family == "dream" else LLaDAModel(LLaDAConfig(**SHAPES))
    model.reset_parameters(std=0.15)
    return model.eval()


class _Oracle:
    """Knows the clean sequence and puts a confident prediction of token i on the row its family says predicts i;
    the LM head on the input embeddings adds a small input-dependent part (so SM parameters get gradients)."""

    answer: torch.Tensor  # int64 [B, T]

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None, logits_rows=None):
        h = self.get_input_embeddings()(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = h.shape
        family = type(self).__name__.removeprefix("Oracle").lower()
        rows = torch.tensor([ROW[family](i) for i in range(T)])
        confident = torch.zeros(B, T, VOCAB)
        for i in range(T):
            confident[torch.arange(B), int(rows[i]), self.answer[:, i]] = 30.0
        logits = confident.to(h.dtype) + 0.01 * self.get_output_embeddings()(h)
        return LMOutput(select_rows(logits, logits_rows))


class OracleDream(_Oracle, DreamModel):
    pass


class OracleLLaDA(_Oracle, LLaDAModel):
    pass


def oracle(family: str, answer: torch.Tensor) -> DreamModel | LLaDAModel:
    torch.manual_seed(0)
    model = OracleDream(DreamConfig(**SHAPES)) if family == "dream" else OracleLLaDA(LLaDAConfig(**SHAPES))
    model.answer = answer
    return model.eval()


def clean_batch(batch: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(2, MASK, (batch, length), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_conventions(family):
    model = tiny_model(family)
    assert family_of(model).name == family
    assert family_of(model).logit_shift == (1 if family == "dream" else 0)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_two_pass_sm_step_matches_the_dense_formulation(family):
    model = tiny_model(family)
    sm = SoftMask(k=3, scale=0.8, steepness=2.0, centre=-1.0)
    x_t = clean_batch()
    x_t[0, [0, 3, 4, 9]] = MASK
    x_t[1, [1, 2, 7]] = MASK
    first = model(input_ids=x_t).logits
    table = model.get_input_embeddings().weight
    embeds = table[x_t].clone()
    for b, i in (x_t == MASK).nonzero().tolist():
        row = first[b, ROW[family](i)][None]
        lam = sm.lam(reference.neg_entropy(row))
        embeds[b, i] = reference.dense_soft_embeddings(row, table, MASK, lam, sm.k)[0]
    expected = model(inputs_embeds=embeds).logits
    torch.testing.assert_close(soft_mask_forward(model, sm, x_t, None, MASK), expected, rtol=1e-4, atol=1e-5)
    built = sm.build_embeddings(x_t, first, table, MASK, family_of(model).logit_shift)
    torch.testing.assert_close(built, embeds, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_objective_reads_the_familys_rows(family):
    logits = torch.randn(2, 7, VOCAB)
    targets = torch.randint(0, VOCAB, (2, 7))
    masked = torch.zeros(2, 7, dtype=torch.bool)
    masked[0, [0, 2, 5]] = True
    masked[1, 6] = True
    expected = (
        sum(
            F.cross_entropy(logits[b, ROW[family](i)], targets[b, i], reduction="sum")
            for b, i in masked.nonzero().tolist()
        )
        / 0.5
        / 9
    )
    shift = tiny_model(family).family.logit_shift
    torch.testing.assert_close(masked_token_loss(logits, targets, masked, 0.5, 9, shift), expected)


def _batches(answer: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    prompt = torch.zeros(answer.shape[1], dtype=torch.bool)
    prompt[:2] = True  # position 0 (which Dream predicts from its own row) stays a prompt token
    return [collate([Example(row, prompt) for row in answer], PAD)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("soft", [False, True])
def test_elbo_of_an_oracle_is_zero(family, soft):
    answer = clean_batch()
    result = estimate_elbo(
        oracle(family, answer),
        _batches(answer),
        MASK,
        num_samples=2,
        progress=False,
        soft_mask=SoftMask(k=2) if soft else None,
    )
    assert result.nll_bound < 1e-3 and result.num_tokens == answer.numel() - 2 * answer.shape[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_gate_init_reads_the_familys_rows(family):
    answer = clean_batch(batch=1, length=12).expand(2, 12)  # equal rows: the data order does not matter
    model = oracle(family, answer)
    data = [Example(row, torch.arange(12) < 2) for row in answer]
    noise = NoiseSchedule(0.3, 0.9)
    neg_entropy = masked_neg_entropy(model, data, MASK, PAD, noise, batch_size=2, batches=1)
    assert neg_entropy.numel() > 0 and bool((neg_entropy > -1e-3).all())  # the oracle is sure of every position
    _, accuracy = scale_gradient(model, SoftMask(k=2), data, MASK, PAD, noise, batch_size=2, batches=1)
    assert accuracy.tolist() == [1.0]  # and right, when read at the family's rows


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("soft", [False, True])
def test_plain_decoding_reads_the_familys_rows(family, soft):
    answer = clean_batch(batch=2, length=9)
    prompt = answer[:, :4]
    # each family's own confidence rule (Dream: alg, LLaDA: remasking)
    rule = dict(alg="maskgit_plus") if family == "dream" else dict(remasking="low_confidence")
    out = diffusion_generate(
        oracle(family, answer),
        prompt,
        max_new_tokens=5,
        steps=3,
        temperature=0.0,
        soft_mask=SoftMask(k=2) if soft else None,
        **rule,
    )
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    assert torch.equal(sequences, answer)


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_decoding_of_a_real_model_is_stable_under_padding(family):
    model = tiny_model(family)
    prompt = clean_batch(batch=1, length=4)
    alone = diffusion_generate(model, prompt, max_new_tokens=4, steps=4, temperature=0.0)
    padded = torch.cat([torch.full((1, 3), PAD), prompt], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 4, dtype=torch.long)], dim=1)
    together = diffusion_generate(model, padded, mask, max_new_tokens=4, steps=4, temperature=0.0)
    assert torch.equal(together[:, 3:], alone)


def test_model_modules_import_each_other_without_a_cycle():
    """Every import between the modules of softmask_ext.model (at module level or inside functions) goes one way."""
    import ast
    from pathlib import Path

    import softmask_ext.model as package

    folder = Path(package.__file__).parent
    modules = {path.stem for path in folder.glob("*.py")} - {"__init__"}
    edges = {}
    for name in modules:
        tree = ast.parse((folder / f"{name}.py").read_text())
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                targets |= {node.module} if node.module else {alias.name for alias in node.names}
        edges[name] = targets & modules
    visiting, done = set(), set()

    def visit(name, path):
        assert name not in visiting, f"import cycle: {' -> '.join(path)}"
        if name in done:
            return
        visiting.add(name)
        for target in edges[name]:
            visit(target, [*path, target])
        visiting.discard(name)
        done.add(name)

    for name in sorted(modules):
        visit(name, [name])
