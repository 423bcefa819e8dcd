"""planner.cost: the presets' numbers, memory capacity, JSON round trips and validation messages."""

from __future__ import annotations

import json
import math

import pytest

from planner.cost import CostModel, zero_model_state_gb


@pytest.fixture
def flexsp() -> CostModel:
    return CostModel.preset("flexsp-gpt7b-a100")


def small_model(**overrides) -> CostModel:
    fields = {
        "quad_ms": 1e-4,
        "lin_ms": 0.1,
        "beta_ms": 10.0,
        "act_mb_per_token": 1.0,
        "memory_budget_gb": 1.0,
        "seq_comm": "allgather",
        "comm_bytes_per_token": 1024.0,
        "comm_bytes_per_group": 4096.0,
        "bandwidth_gbps": {2: 10.0, 4: 5.0},
    }
    fields.update(overrides)
    return CostModel(**fields)


def test_flexsp_token_capacity_matches_the_artefact(flexsp):
    # The artefact's formula, (28 GB − 7 × 16 GB / N) × 1024 / 4.480441895 MB per token, gives
    # exactly 5,999 tokens/GPU at 64 GPUs (the FlexSP brief quotes ≈5.9K, ≈381K per micro-batch).
    assert flexsp.token_capacity(1) == 5999
    for world in (8, 16, 32, 64, 128, 1024):
        cost = CostModel.preset("flexsp-gpt7b-a100", world_size=world)
        assert cost.token_capacity(1) == math.floor((28 - 7 * 16 / world) * 1024 / 4.480441895)
    # Ulysses' capacity is linear in the degree (no gathered K/V); cluster-wide at 64 GPUs:
    assert flexsp.token_capacity(64) == pytest.approx(64 * 5999, abs=64)
    assert abs(flexsp.token_capacity(64) - 381_000) <= 0.03 * 381_000


def test_cpu_auto_budget_comes_from_the_machine_and_fits_the_default_configuration():
    from planner.presets import CPU_MEMORY_SHARE, HybridShape, cpu_cost_model, machine_memory_bytes
    from runtime.config import Config

    config = Config()
    shape = HybridShape.of_model(config.model, config.moe, act_bytes=4)
    # A pinned 8 GiB machine with 4 ranks: CPU_MEMORY_SHARE of it, split four ways.
    pinned = cpu_cost_model(shape, world_size=4, ranks_per_machine=4, memory_bytes=8 * 2**30)
    assert pinned.memory_budget_gb == pytest.approx(CPU_MEMORY_SHARE * 8 / 4)
    assert pinned.max_sequence_length(4) >= config.data.max_seq_len
    here = cpu_cost_model(shape, world_size=2, ranks_per_machine=2)
    assert here.memory_budget_gb == pytest.approx(CPU_MEMORY_SHARE * machine_memory_bytes() / 2 / 2**30)
    with pytest.raises(ValueError, match="does not hold the model states"):
        cpu_cost_model(shape, world_size=1, ranks_per_machine=1, memory_bytes=2**20)


def test_flexsp_alltoall_share_reproduces_the_paper_ratios(flexsp):
    # research/flexsp.md §1 (derived from the artefact): all-to-all / compute at s = 64K is
    # 0.04 at d = 8 and 0.37 at d = 16; at s = 8K and d = 64 the all-to-all is 1.8x the compute.
    def comm_over_compute(s, d):
        compute = (flexsp.quad_ms * s * s + flexsp.lin_ms * s) / d
        return (flexsp.seq_time_ms(s, d) - compute) / compute

    assert comm_over_compute(65536, 8) == pytest.approx(0.04, abs=0.005)
    assert comm_over_compute(65536, 16) == pytest.approx(0.37, abs=0.01)
    assert comm_over_compute(8192, 64) == pytest.approx(1.8, abs=0.05)


def test_flexsp_coefficients(flexsp):
    assert (flexsp.quad_ms, flexsp.lin_ms, flexsp.beta_ms) == (5.128e-6, 0.1839576, 629.3563)
    assert flexsp.comm_bytes_per_token == 4 * 2 * 32 * 4096 * 2
    assert flexsp.bandwidth(16) == 10.33
    # Degrees beyond the table reuse its last entry (projections past 64 GPUs).
    assert flexsp.bandwidth(128) == flexsp.bandwidth(64) == 4.87
    assert flexsp.max_degree == 64 and flexsp.degrees(256)[-1] == 64
    # A group of one rank communicates nothing: only compute.
    assert flexsp.seq_time_ms(1000, 1) == pytest.approx(5.128e-6 * 1e6 + 0.1839576 * 1000)
    assert flexsp.group_time_ms([1000, 2000], 2) == pytest.approx(
        629.3563 + flexsp.seq_time_ms(1000, 2) + flexsp.seq_time_ms(2000, 2)
    )
    assert flexsp.group_time_ms([], 4) == 0.0


@pytest.mark.parametrize("name", CostModel.presets())
def test_presets_round_trip_through_json(name, tmp_path):
    cost = CostModel.preset(name)
    assert CostModel.from_json(cost.to_json()) == cost
    path = tmp_path / "cost.json"
    path.write_text(cost.to_json())
    assert CostModel.from_json(path) == cost
    assert CostModel.from_json(str(path)) == cost
    assert cost.notes, "every preset states its provenance"


def test_presets_cover_the_documented_names():
    assert {"flexsp-gpt7b-a100", "hybrid-1b-h100", "tiny-cpu"} <= set(CostModel.presets())


def test_preset_world_size_reshards_model_states():
    at_64 = CostModel.preset("flexsp-gpt7b-a100")
    at_16 = CostModel.preset("flexsp-gpt7b-a100", world_size=16)
    assert at_16.model_state_gb == pytest.approx(4 * at_64.model_state_gb)
    assert at_16.token_capacity(1) < at_64.token_capacity(1)


def test_hybrid_preset_is_derived_and_sane():
    cost = CostModel.preset("hybrid-1b-h100")
    assert "FLOP" in cost.notes and "profile" in cost.notes
    # Softmax attention overtakes the linear part in the tens of thousands of tokens.
    assert 10_000 < cost.lin_ms / cost.quad_ms < 100_000
    # LASP-2H all-gather: traffic share (d-1)/d, transient gathered K/V grows with the degree.
    assert cost.seq_comm == "allgather" and cost.kv_gather_mb_per_token > 0
    assert cost.group_overhead_ms(16) > cost.group_overhead_ms(8) > cost.beta_ms  # LASP-2 states, IB cliff
    assert cost.rank_memory_mb_per_token(8) > cost.act_mb_per_token / 8


def test_zero_model_state():
    # ZeRO-3 shards all 16 bytes/param; ZeRO-1 keeps 4 (weights + grads) replicated.
    assert zero_model_state_gb(2**30, zero_stage=3, world_size=8) == pytest.approx(2.0)
    assert zero_model_state_gb(2**30, zero_stage=1, world_size=8) == pytest.approx(4 + 12 / 8)
    assert zero_model_state_gb(2**30, zero_stage=0, world_size=8) == pytest.approx(16.0)
    with pytest.raises(ValueError, match="zero_stage"):
        zero_model_state_gb(1e9, zero_stage=4, world_size=8)


def test_memory_and_capacity_agree():
    cost = small_model(kv_gather_mb_per_token=0.5, model_state_gb=0.25)
    for d in (1, 2, 4):
        cap = cost.token_capacity(d)
        assert cost.fits([cap], d) and not cost.fits([cap + 1], d)
        assert cost.group_memory_gb([cap], d) <= cost.memory_budget_gb + 1e-12
        assert cost.group_memory_gb([cap + 1], d) > cost.memory_budget_gb
    # Gathered K/V make capacity sub-linear in the degree: 768 MB free / (1 + 0.5·(d−1))/d MB.
    assert [cost.token_capacity(d) for d in (1, 2, 4)] == [768, 1024, 1228]


def test_min_degree():
    cost = small_model()  # 1024 tokens per rank
    assert [cost.min_degree(s) for s in (1, 1024, 1025, 4096)] == [1, 1, 2, 4]
    with pytest.raises(ValueError, match="does not fit in any SP group.*largest allowed degree 4 holds 4096"):
        cost.min_degree(5000, num_ranks=4)
    limited = small_model(max_degree=2)
    assert limited.token_capacity(4) == 0
    with pytest.raises(ValueError, match="max_degree=2"):
        limited.min_degree(3000, num_ranks=8)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown cost-model preset 'flexsp-gpt7b'; did you mean 'flexsp-gpt7b-a100'"):
        CostModel.preset("flexsp-gpt7b")


@pytest.mark.parametrize(
    "change,field",
    [
        ({"quad_ms": -1.0}, "quad_ms"),
        ({"lin_ms": math.nan}, "lin_ms"),
        ({"act_mb_per_token": 0.0}, "act_mb_per_token"),
        ({"memory_budget_gb": "big"}, "memory_budget_gb"),
        ({"model_state_gb": 2.0}, "memory_budget_gb"),
        ({"seq_comm": "ring"}, "seq_comm"),
        ({"bandwidth_gbps": {3: 1.0}}, "bandwidth_gbps"),
        ({"bandwidth_gbps": {"two": 1.0}}, "bandwidth_gbps"),
        ({"bandwidth_gbps": {2: 0.0}}, r"bandwidth_gbps\[2\]"),
        ({"bandwidth_gbps": {}}, "bandwidth_gbps"),
        ({"moe_bytes_per_token": 10.0}, "ep_bandwidth_gbps"),
        ({"max_degree": 6}, "max_degree"),
        ({"beta_ms": True}, "beta_ms"),
    ],
)
def test_bad_fields_are_named(change, field):
    with pytest.raises(ValueError, match=field):
        small_model(**change)


def test_bad_json_is_named(tmp_path):
    data = json.loads(small_model().to_json())
    with pytest.raises(ValueError, match="unknown field 'quad'; did you mean 'quad_ms'"):
        CostModel.from_json(json.dumps({**data, "quad": 1.0}))
    del data["lin_ms"]
    with pytest.raises(ValueError, match="missing field.*lin_ms"):
        CostModel.from_json(json.dumps(data))
    with pytest.raises(ValueError, match="invalid JSON"):
        CostModel.from_json("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        CostModel.from_json(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="object of fields"):
        CostModel.from_json("[1, 2]")


def test_bandwidth_table_without_the_degree():
    cost = small_model(bandwidth_gbps={4: 5.0})
    with pytest.raises(ValueError, match="no entry for degree 2"):
        cost.seq_time_ms(100, 2)


def test_auto_on_cpu_holds_the_default_max_seq_len():
    # `planner.cost_model = "auto"` without a GPU: the default configuration's 2048-token
    # sequences fit (the tiny-cpu preset's synthetic cap of ~630 tokens per rank rejected them).
    pytest.importorskip("deepspeed")
    import torch

    from runtime.config import Config
    from runtime.train import resolve_cost_model

    if torch.cuda.is_available():
        pytest.skip("auto picks the GPU preset here")
    config = Config()
    cost = resolve_cost_model(config, 2)
    assert cost.name == "cpu-auto"
    assert cost.max_sequence_length(2) >= config.data.max_seq_len


def test_quad_sp_factor_scales_the_softmax_term_above_one_rank():
    plain, doc = small_model(), small_model(quad_sp_factor=1.7)
    for s in (64, 1000):
        # one rank: the factor does not apply
        assert doc.seq_time_ms(s, 1) == plain.seq_time_ms(s, 1)
        for d in (2, 4):
            extra = 0.7 * plain.quad_ms * s * s / d  # (q - 1)·quad_ms·s²/d
            assert doc.seq_time_ms(s, d) == pytest.approx(plain.seq_time_ms(s, d) + extra, rel=1e-12)
    # the vectorised form the planner's solvers use agrees with the scalar one
    lengths = [64, 300, 1000]
    for d in (1, 2, 4):
        got = doc.seq_times_ms(lengths, d).tolist()
        assert got == pytest.approx([doc.seq_time_ms(s, d) for s in lengths], rel=1e-12)
    assert doc.group_time_ms(lengths, 2) == pytest.approx(
        doc.group_overhead_ms(2) + sum(doc.seq_time_ms(s, 2) for s in lengths), rel=1e-12
    )


def test_lin_sp_factor_scales_the_per_token_term_above_one_rank():
    plain, spread = small_model(quad_sp_factor=1.3), small_model(quad_sp_factor=1.3, lin_sp_factor=1.25)
    lengths = [64, 300, 1000]
    for s in lengths:
        assert spread.seq_time_ms(s, 1) == plain.seq_time_ms(s, 1)  # one rank: the factor does not apply
        for d in (2, 3, 4):
            extra = 0.25 * plain.lin_ms * s / d  # (r - 1)·lin_ms·s/d
            assert spread.seq_time_ms(s, d) == pytest.approx(plain.seq_time_ms(s, d) + extra, rel=1e-12)
    for d in (1, 2, 4):  # the planner's vectorised form follows the scalar one
        got = spread.seq_times_ms(lengths, d).tolist()
        assert got == pytest.approx([spread.seq_time_ms(s, d) for s in lengths], rel=1e-12)


def test_step_term_is_added_once_per_step():
    cost = small_model(step_ms=120.0)
    assert cost.step_time_ms([10.0, 20.5]) == pytest.approx(150.5, rel=1e-12)
    assert cost.step_time_ms([]) == 120.0
    assert small_model().step_time_ms([10.0]) == 10.0  # default 0: no step term


def test_new_fields_round_trip_and_old_json_still_loads():
    cost = small_model(quad_sp_factor=1.6, lin_sp_factor=1.2, step_ms=42.0)
    again = CostModel.from_json(cost.to_json())
    assert again == cost and (again.quad_sp_factor, again.lin_sp_factor, again.step_ms) == (1.6, 1.2, 42.0)
    old = json.loads(cost.to_json())
    del old["quad_sp_factor"], old["lin_sp_factor"], old["step_ms"]  # a file written before the fields existed
    loaded = CostModel.from_json(json.dumps(old))
    assert (loaded.quad_sp_factor, loaded.lin_sp_factor, loaded.step_ms) == (1.0, 1.0, 0.0)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"quad_sp_factor": 0.0}, "quad_sp_factor"),
        ({"lin_sp_factor": 0.0}, "lin_sp_factor"),
        ({"lin_sp_factor": float("nan")}, "lin_sp_factor"),
        ({"step_ms": -1.0}, "step_ms"),
    ],
)
def test_bad_new_fields_are_named(change, match):
    with pytest.raises(ValueError, match=match):
        small_model(**change)


def test_published_presets_keep_the_even_split_and_cpu_presets_the_per_document_factor():
    from planner.presets import CPU_QUAD_SP_FACTOR, HybridShape, cpu_cost_model
    from runtime.config import Config

    assert CostModel.preset("flexsp-gpt7b-a100").quad_sp_factor == 1.0
    assert CostModel.preset("hybrid-1b-h100").quad_sp_factor == 1.0
    assert CostModel.preset("tiny-cpu").quad_sp_factor == CPU_QUAD_SP_FACTOR > 1
    config = Config()
    shape = HybridShape.of_model(config.model, config.moe, act_bytes=4)
    auto = cpu_cost_model(shape, world_size=2, ranks_per_machine=2, memory_bytes=8 * 2**30)
    assert auto.quad_sp_factor == CPU_QUAD_SP_FACTOR
