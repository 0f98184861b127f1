"""FedKDLoRA's teacher and server-side distillation on the real MiniLM and real data."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from fedkdlora_app.bookkeeping import payload_bytes
from fedkdlora_app.client_app import local_train
from fedkdlora_app.config import ConfigError
from fedkdlora_app.data import eval_split, loader_for, public_slice
from fedkdlora_app.models import ModelError, build_student, load_classifier, shipped_state
from fedkdlora_app.teacher import TEACHER_INFO, build_teacher, load_teacher
from fedkdlora_app.training import distill_optimizer, evaluate, mutual_distill
from fedkdlora_app.wire import to_wire
from fedkdlora_tools import pretrain as pretrain_module
from fedkdlora_tools.pretrain import main as pretrain_main
from tests.helpers import GLUE_DIR, REPO, make_config

TINY = {"max-public-examples": 16, "batch-size": 8, "max-eval-examples": 16, "teacher-pretrain-epochs": 1}


def _kd_config(**overrides):
    return make_config(**{"scheme": "fedkdlora", "task": "sst2", **TINY, **overrides})


def test_one_distillation_step_moves_lora_and_teacher_but_not_the_frozen_base() -> None:
    config = _kd_config()
    torch.manual_seed(0)
    student = build_student(config, attn_implementation="eager")
    teacher = load_classifier("", 2, attn_implementation="eager")
    frozen_before = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    shipped_before = {k: v.clone() for k, v in shipped_state(student, config).items()}
    teacher_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}

    loader = loader_for(public_slice(config).select(range(8)), config)  # one batch: one step
    terms = mutual_distill(
        student,
        teacher,
        loader,
        config.distill_student_lr,
        config.distill_teacher_lr,
        1,
        torch.device("cpu"),
        "test",
    )

    assert set(terms) == {
        "loss",
        "ce_student",
        "ce_teacher",
        "kl_teacher_student",
        "kl_student_teacher",
        "attention_mse",
    }
    assert all(v >= 0 for v in terms.values()) and terms["attention_mse"] > 0
    shipped_after = shipped_state(student, config)
    assert any(not torch.equal(shipped_before[k], shipped_after[k]) for k in shipped_before if "lora_" in k)
    assert any(not torch.equal(teacher_before[n], p) for n, p in teacher.named_parameters())
    for name, param in student.named_parameters():
        if name in frozen_before:
            assert torch.equal(frozen_before[name], param), name


def test_student_and_teacher_step_at_their_own_rates() -> None:
    """One AdamW step moves a parameter by about its group's lr: student 1e-3, teacher 1e-5."""
    config = _kd_config()
    torch.manual_seed(0)
    student = build_student(config, attn_implementation="eager")
    teacher = load_classifier("", 2, attn_implementation="eager")
    student_before = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    teacher_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    loader = loader_for(public_slice(config).select(range(8)), config)  # one batch: one step
    mutual_distill(student, teacher, loader, 1e-3, 1e-5, 1, torch.device("cpu"), "test")

    student_step = max(
        (p - student_before[n]).abs().max() for n, p in student.named_parameters() if n in student_before
    )
    teacher_step = max((p - teacher_before[n]).abs().max() for n, p in teacher.named_parameters())
    assert 5e-4 < student_step <= 1.1e-3
    assert 0 < teacher_step <= 2e-5  # float32 rounding adds ~1e-7


def test_distill_optimizer_decays_each_group_from_its_own_rate() -> None:
    student, teacher = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    optimizer, schedule = distill_optimizer(student, teacher, 2e-3, 2e-5, steps=4)
    assert [g["lr"] for g in optimizer.param_groups] == [2e-3, 2e-5]
    optimizer.step()
    schedule.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1.5e-3, 1.5e-5])


def _layout(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Size, torch.dtype]]:
    return {key: (tensor.shape, tensor.dtype) for key, tensor in state.items()}


def test_fedkdlora_ships_exactly_the_fedlora_state() -> None:
    """Same keys, shapes, dtypes and bytes as a FedLoRA student, from the server after distillation
    and from a client after local training; the same values where the two do the same work."""
    tiny = {"max-train-examples-per-client": 8, "batch-size": 8}
    kd, lora = _kd_config(**tiny), make_config(scheme="fedlora", task="sst2", **tiny)
    kd_student = build_student(kd, attn_implementation="eager")  # the server's, with attention maps
    # cloned: on the CPU shipped_state's tensors share the model's storage
    kd_initial = {k: v.clone() for k, v in shipped_state(kd_student, kd).items()}
    lora_initial = {k: v.clone() for k, v in shipped_state(build_student(lora), lora).items()}
    assert _layout(kd_initial) == _layout(lora_initial)
    assert all(torch.equal(kd_initial[k], lora_initial[k]) for k in lora_initial)  # the same start

    teacher = load_classifier("", 2, attn_implementation="eager")
    loader = loader_for(public_slice(kd).select(range(8)), kd)  # one step of server-side distillation
    mutual_distill(
        kd_student,
        teacher,
        loader,
        kd.distill_student_lr,
        kd.distill_teacher_lr,
        1,
        torch.device("cpu"),
        "test",
    )
    kd_down = shipped_state(kd_student, kd)
    assert any(not torch.equal(kd_down[k], kd_initial[k]) for k in kd_initial)
    # a client's round (client-kd off): FedLoRA's local training, bit for bit
    kd_up, _ = local_train(kd, 0, 2, 1, kd_initial)
    lora_up, _ = local_train(lora, 0, 2, 1, lora_initial)
    assert all(torch.equal(kd_up[k], lora_up[k]) for k in lora_up) and kd_up.keys() == lora_up.keys()

    lora_bytes = payload_bytes(to_wire(lora_up, lora.wire_dtype))
    assert lora_bytes == payload_bytes(to_wire(lora_initial, lora.wire_dtype))
    for state in (kd_down, kd_up):
        assert _layout(state) == _layout(lora_up)
        assert payload_bytes(to_wire(state, kd.wire_dtype)) == lora_bytes


def test_a_nan_in_distillation_names_the_round() -> None:
    config = _kd_config()
    student = build_student(config, attn_implementation="eager")
    teacher = load_classifier("", 2, attn_implementation="eager")
    with torch.no_grad():
        next(p for n, p in teacher.named_parameters() if "classifier.weight" in n).fill_(float("nan"))
    loader = loader_for(public_slice(config).select(range(8)), config)
    with pytest.raises(FloatingPointError, match="round 3: mutual distillation: loss became nan"):
        mutual_distill(
            student, teacher, loader, 1e-5, 1e-5, 1, torch.device("cpu"), "round 3: mutual distillation"
        )


def test_pretrain_command_writes_a_teacher_a_run_accepts(tmp_path, capsys) -> None:
    out = tmp_path / "teacher"
    code = pretrain_main(
        [
            "--app",
            str(REPO),
            "--task",
            "sst2",
            "--data-dir",
            str(GLUE_DIR),
            "--epochs",
            "1",
            "--max-public-examples",
            "16",
            "--max-eval-examples",
            "16",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "dev accuracy" in printed and str(out) in printed
    info = json.loads((out / TEACHER_INFO).read_text())
    assert info["task"] == "sst2" and info["public_examples"] == 16 and info["dev"]["num_examples"] == 16
    teacher, _ = load_teacher(_kd_config(**{"teacher-model": str(out)}))
    assert teacher.config.num_hidden_layers == 6
    with pytest.raises(ConfigError, match=r"'teacher-model' = .*pre-trained with task 'sst2'"):
        load_teacher(_kd_config(task="cola", **{"teacher-model": str(out)}))


def test_pretrain_command_names_bad_input_in_one_line_and_lets_a_bug_surface(
    tmp_path, capsys, monkeypatch
) -> None:
    """Exit 2 and one line for the app's input errors only; any other error is a bug, raised as is."""
    argv = ["--app", str(REPO), "--task", "sst2", "--out", str(tmp_path / "teacher")]
    assert pretrain_main([*argv, "--data-dir", str(tmp_path / "missing")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("fedkdlora-pretrain-teacher: ") and str(tmp_path / "missing") in line

    def broken(config, device):
        raise ValueError("a bug, not a setting")

    monkeypatch.setattr(pretrain_module, "pretrain_teacher", broken)
    with pytest.raises(ValueError, match="a bug, not a setting"):
        pretrain_main([*argv, "--data-dir", str(GLUE_DIR)])


def test_build_teacher_pretrains_when_none_is_given() -> None:
    """Every weight moves off the base's, the recorded dev metrics are the trained teacher's,
    and the loss on the public slice it trained on (2 steps of 8) drops."""
    config = _kd_config()
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    teacher, info = build_teacher(config, cpu)
    torch.manual_seed(0)  # the same draw of the fresh head: the teacher before pre-training
    base = load_classifier(config.teacher_base_model, 2, attn_implementation="eager")
    assert info["public_examples"] == 16 and info["epochs"] == 1
    assert teacher.config.num_hidden_layers == 6
    trained, untrained = teacher.state_dict(), base.state_dict()
    assert trained.keys() == untrained.keys()
    assert [k for k in untrained if torch.equal(trained[k], untrained[k])] == []  # full fine-tuning

    dev = loader_for(eval_split(config), config)
    assert info["dev"] == evaluate(teacher, dev, cpu).metrics() and info["dev"]["num_examples"] == 16
    assert info["dev"]["loss"] != evaluate(base, dev, cpu).metrics()["loss"]
    public = loader_for(public_slice(config), config)
    assert evaluate(teacher, public, cpu).metrics()["loss"] < evaluate(base, public, cpu).metrics()["loss"]


@pytest.fixture()
def foreign_vocab_teacher(tmp_path):
    """A real (tiny) BERT whose tokenizer has another vocabulary than the student's."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    return tmp_path


def test_teacher_with_another_vocabulary_is_refused(foreign_vocab_teacher) -> None:
    with pytest.raises(ModelError) as error:
        load_teacher(_kd_config(**{"teacher-model": str(foreign_vocab_teacher)}))
    assert "'teacher-model'" in str(
        error.value
    ) and "vs 30522); teacher and student must share one tokenizer" in str(error.value)
    with pytest.raises(ModelError, match="'teacher-base-model' = "):
        build_teacher(_kd_config(**{"teacher-base-model": str(foreign_vocab_teacher)}), torch.device("cpu"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kd-epochs": -1}, "'kd-epochs' = -1: must be >= 0"),
        ({"teacher-model": "/no/such/teacher"}, "'teacher-model' = '/no/such/teacher': no model directory"),
        ({"distill-teacher-lr": 0.0}, "'distill-teacher-lr' = 0.0: must be > 0"),
        ({"distill-student-lr": -1e-3}, "'distill-student-lr' = -0.001: must be > 0"),
        ({"teacher-data-pct": 0.0}, "'teacher-data-pct' = 0.0: fedkdlora needs a public slice"),
        ({"scheme": "fedlora", "client-kd": True}, "'client-kd' = true: needs scheme 'fedkdlora'"),
    ],
)
def test_bad_kd_settings_name_the_key(overrides, message) -> None:
    with pytest.raises(ConfigError) as error:
        _kd_config(**overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_shipped_client_kd_teacher_outlives_the_clientapp_and_a_restart(
    tmp_path, foreign_vocab_teacher
) -> None:
    """The teacher lived in context.state, lost when a SuperNode restarts; now it is on the node's disk."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedkdlora_app.client_app import NoTeacherError, _teacher_from_path, frozen_teacher
    from fedkdlora_app.config import NodeRun
    from fedkdlora_app.distillation import teacher_records
    from fedkdlora_app.protocol import NO_TEACHER, TEACHER_ID_KEY

    shipped = load_classifier(str(foreign_vocab_teacher), 2)
    node = NodeRun(_kd_config(**{"client-kd": True}), 0, 2, cache_dir=str(tmp_path / "cache"))
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0

    def train_message(teacher_id: str, with_teacher: bool) -> Message:
        config = ConfigRecord({"server-round": 1, TEACHER_ID_KEY: teacher_id})
        records = teacher_records(shipped, teacher_id) if with_teacher else {}
        return Message(RecordDict({"config": config, **records}), dst_node_id=5, message_type="train")

    first = frozen_teacher(train_message("run-a", with_teacher=True), node)
    _teacher_from_path.cache_clear()  # a new ClientApp process, e.g. after the SuperNode restarted
    later = frozen_teacher(train_message("run-a", with_teacher=False), node)
    assert later is not first and (tmp_path / "cache" / "run-a" / "config.json").is_file()
    for (name, a), b in zip(shipped.state_dict().items(), later.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not any(p.requires_grad for p in later.parameters())
    with pytest.raises(NoTeacherError, match=f"this node {NO_TEACHER} 'run-b'"):
        frozen_teacher(train_message("run-b", with_teacher=False), node)
