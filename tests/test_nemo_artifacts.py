"""A ``.nemo`` is self-contained: the student's tokenizer travels inside it, and ``import nemo_kd`` is
all a fresh process needs to restore it.

Made here: a byte-level BPE tokenizer, 16 jsonl samples, an SFT-only student trained for 2 steps and
saved as ``student.nemo``. Then the tokenizer directory and the trainer's tokenizer cache are deleted
and the ``.nemo`` moved (what a copy to another machine looks like); every check runs in a fresh
process with an empty cache, against references recorded before the deletion: the original files'
bytes, their token ids, the dataset's tokenisation, the student's weights and logits.
"""

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import textwrap

import pytest
import torch

MAX_LEN, N = 40, 16
TEXTS = ["what is 3 plus 9? 12 because adding numbers", "question 7: answer 28, because adding numbers works."]
MESSAGES = [{"role": "user", "content": "what is 2 plus 6?"}, {"role": "assistant", "content": "8"}]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _run(script: str, cache_dir: str, timeout: int = 240) -> dict:
    """Run ``script`` in a fresh interpreter (world of one, its own empty cache); return its last JSON line."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), NEMO_KD_CACHE_DIR=cache_dir,
               PYTHONPATH=REPO, OMP_NUM_THREADS=str(torch.get_num_threads()))  # the logits compare bit for bit:
    # the reference came from this process, and another thread count splits the matmuls' sums differently
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """student.nemo of a 2-step SFT run, with its tokenizer directory and tokenizer cache deleted."""
    import lightning.pytorch as pl
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from nemo_kd.data.tokenizer_builder import train_byte_level_bpe
    from nemo_kd.data.tokenization import tokenizer_hash
    from nemo_kd.models.distillation_model import GPTDistillationModel
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel
    from nemo_kd.parallel.strategy import MegatronStrategy

    d = tmp_path_factory.mktemp("artifacts")
    env = pytest.MonkeyPatch()  # session-scoped: the function-scoped monkeypatch fixture is not available
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                           NEMO_KD_CACHE_DIR=str(d / "cache")).items():
        env.setenv(key, value)
    texts = [f"question {i}: what is {i} plus {i * 3}? answer: {i + i * 3}, because adding numbers works."
             for i in range(40)]
    tok_dir = str(d / "tok")
    tok = train_byte_level_bpe(texts, vocab_size=300, save_dir=tok_dir)
    data = str(d / "train.jsonl")
    with open(data, "w") as f:
        for i in range(N):
            f.write(json.dumps({"prompt": f"what is {i} plus {i * 3}?", "response": f"{i + i * 3} because adding"})
                    + "\n")
    cfg = OmegaConf.create(dict(
        student=dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                     vocab_size=len(tok), max_position_embeddings=64),
        teacher=dict(mode="none"), kd=dict(kd_loss_weight=0.0, sft_loss_weight=1.0),
        optim=dict(lr=1e-2, warmup_steps=1), parallel=dict(seed=7), max_steps=2,
        data=dict(train_ds=dict(file_path=data, tokenizer=tok_dir, prompt_format="chat", max_seq_length=MAX_LEN,
                                micro_batch_size=2, global_batch_size=4, seed=1), validation_ds=None)))
    initialize_parallel(ParallelConfig(seed=7))
    try:
        trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=MegatronStrategy(), max_steps=2,
                             use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             limit_val_batches=0, default_root_dir=str(d / "fit"))
        model = GPTDistillationModel(cfg, trainer=trainer)
        init = {k: v.clone() for k, v in model.student.state_dict().items() if torch.is_tensor(v)}
        trainer.fit(model)
        assert trainer.global_step == 2
        weights = {k: v.detach().clone() for k, v in model.student.state_dict().items() if torch.is_tensor(v)}
        assert any(not torch.equal(weights[k], init[k]) for k in init)  # it trained
        ids = torch.tensor([tok(TEXTS[0])["input_ids"][:16]])
        model.eval()
        with torch.no_grad():
            logits = model(ids)[..., : len(tok)]
        dataset = model._train_dl.dataset.dataset
        ref = dict(
            ids=[tok(t)["input_ids"] for t in TEXTS], chat=tok.apply_chat_template(MESSAGES, tokenize=False),
            samples=[[list(map(int, dataset[i].input_ids)), list(map(float, dataset[i].loss_mask))]
                     for i in range(len(dataset))],
            files={n: _sha256(os.path.join(tok_dir, n)) for n in os.listdir(tok_dir)}, tok_dir=tok_dir,
            trained_tokenizer_dir=model.tokenizer_dir, vocab=len(tok), tokenizer_hash=tokenizer_hash(tok))
        torch.save(weights, str(d / "weights.pt"))
        torch.save({"ids": ids, "logits": logits}, str(d / "logits.pt"))
        os.makedirs(d / "saved")
        model.save_to(str(d / "saved" / "student.nemo"))
        assert sorted(os.listdir(d / "saved")) == ["student.nemo"]  # written under a temporary name, renamed
        del model, trainer
    finally:
        destroy_parallel()
        env.undo()
    # "another machine": neither the tokenizer directory nor the trainer's cache exists, the .nemo moved
    shutil.rmtree(tok_dir)
    shutil.rmtree(d / "cache")
    os.makedirs(d / "moved")
    shutil.move(str(d / "saved" / "student.nemo"), str(d / "moved" / "student.nemo"))
    return dict(dir=d, nemo=str(d / "moved" / "student.nemo"), weights=str(d / "weights.pt"),
                logits=str(d / "logits.pt"), ref=ref, data=data)


def test_tokenizer_files_are_packed_and_recorded(packed):
    """The archive holds each tokenizer file as a NeMo artifact (``<uuid>_<name>``), byte-identical, and
    ``model_config.yaml`` names them ``nemo:...`` under ``tokenizer.files`` (no absolute path needed)."""
    import yaml

    with tarfile.open(packed["nemo"], "r:*") as tar:
        members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
        cfg = yaml.safe_load(tar.extractfile(members["model_config.yaml"]).read())
        section = cfg["tokenizer"]
        assert section["library"] == "huggingface" and section["source"] == packed["ref"]["tok_dir"]
        names = {e["name"]: e["path"] for e in section["files"].values()}
        assert set(names) == set(packed["ref"]["files"])  # tokenizer.json, tokenizer_config.json, ...
        assert {"tokenizer.json", "tokenizer_config.json"} <= set(names)
        for name, path in names.items():
            assert path.startswith("nemo:") and path.endswith("_" + name), path
            data = tar.extractfile(members[path[len("nemo:"):]]).read()
            assert hashlib.sha256(data).hexdigest() == packed["ref"]["files"][name], name


def test_import_nemo_kd_restores_in_a_fresh_process(packed, tmp_path):
    """``import nemo_kd`` then ``ModelPT.restore_from``: no UnsafeTargetError, same weights and logits, the
    tokenizer loads from the model's own copy and tokenises like the deleted original, the training data
    tokenises identically through it, and a re-saved .nemo restores after the first one is gone."""
    nemo = str(tmp_path / "student.nemo")
    shutil.copy(packed["nemo"], nemo)
    out = _run(f"""
        import hashlib, json, os, sys
        import torch
        import nemo_kd
        assert "nemo_kd.models.distillation_model" not in sys.modules and "nemo" not in sys.modules
        from nemo.core.classes import ModelPT
        from transformers import AutoTokenizer

        def check(m):
            ref = torch.load({packed['weights']!r}, weights_only=True)
            sd = {{k: v for k, v in m.student.state_dict().items() if torch.is_tensor(v)}}
            x = torch.load({packed['logits']!r}, weights_only=True)
            m.eval()
            with torch.no_grad():
                logits = m(x["ids"])[..., :{packed['ref']['vocab']}]
            tok = AutoTokenizer.from_pretrained(m.tokenizer_dir)
            return dict(cls=type(m).__module__ + "." + type(m).__name__, keys=sorted(sd) == sorted(ref),
                        weights=all(torch.equal(sd[k], ref[k]) for k in ref), logits=torch.equal(logits, x["logits"]),
                        tokenizer_dir=m.tokenizer_dir, ids=[tok(t)["input_ids"] for t in {TEXTS!r}],
                        chat=tok.apply_chat_template({MESSAGES!r}, tokenize=False),
                        files={{n: hashlib.sha256(open(os.path.join(m.tokenizer_dir, n), "rb").read()).hexdigest()
                               for n in os.listdir(m.tokenizer_dir)}})

        m = ModelPT.restore_from({nemo!r}, map_location=torch.device("cpu"))
        first = check(m)
        m.setup_training_data(m.cfg.data.train_ds)  # data.train_ds.tokenizer names the deleted directory
        ds = m._train_dl.dataset.dataset
        first["samples"] = [[list(map(int, ds[i].input_ids)), list(map(float, ds[i].loss_mask))]
                            for i in range(len(ds))]
        m.save_to({str(tmp_path / "resaved.nemo")!r})
        os.remove({nemo!r})
        os.environ["NEMO_KD_CACHE_DIR"] = {str(tmp_path / "cache2")!r}  # nothing cached for the second restore
        second = check(ModelPT.restore_from({str(tmp_path / "resaved.nemo")!r}, map_location=torch.device("cpu")))
        print(json.dumps(dict(first=first, second=second)))
    """, cache_dir=str(tmp_path / "cache1"))
    ref = packed["ref"]
    for which, cache in (("first", "cache1"), ("second", "cache2")):
        got = out[which]
        assert got["cls"] == "nemo_kd.models.distillation_model.GPTDistillationModel"
        assert got["keys"] and got["weights"] and got["logits"], which
        assert got["tokenizer_dir"].startswith(str(tmp_path / cache)), got["tokenizer_dir"]
        assert got["files"] == ref["files"]  # byte-identical to the deleted originals
        assert got["ids"] == ref["ids"] and got["chat"] == ref["chat"]
    assert out["first"]["samples"] == ref["samples"]


def test_convert_cli_exports_the_packed_tokenizer(packed, tmp_path):
    """``nemo-kd-convert-megatron-to-hf`` of the .nemo with no --tokenizer-dir: the HF directory carries the
    tokenizer (byte-identical files, same ids and chat template) and the model's logits are the student's."""
    out_dir = str(tmp_path / "hf")
    out = _run(f"""
        import json, sys
        import torch
        from nemo_kd.convert.cli import megatron_to_hf_main
        rc = megatron_to_hf_main(["--megatron-dir", {packed['nemo']!r}, "--out", {out_dir!r}, "--family", "llama",
                                  "--no-progress"])
        assert rc == 0, rc
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained({out_dir!r})
        model = AutoModelForCausalLM.from_pretrained({out_dir!r}, torch_dtype=torch.float32).eval()
        x = torch.load({packed['logits']!r}, weights_only=True)
        with torch.no_grad():
            logits = model(x["ids"]).logits[..., :{packed['ref']['vocab']}]
        err = float((logits - x["logits"]).abs().max())
        print(json.dumps(dict(ids=[tok(t)["input_ids"] for t in {TEXTS!r}], err=err,
                              chat=tok.apply_chat_template({MESSAGES!r}, tokenize=False))))
    """, cache_dir=str(tmp_path / "cache"))
    ref = packed["ref"]
    for name, digest in ref["files"].items():
        assert _sha256(os.path.join(out_dir, name)) == digest, name
    assert out["ids"] == ref["ids"] and out["chat"] == ref["chat"]
    assert out["err"] < 1e-4, out["err"]


def test_missing_packed_file_is_named(packed, tmp_path, monkeypatch):
    """``nemo_tokenizer_dir`` of the .nemo holds the original files (cached once, reused); a .nemo whose config
    records a tokenizer file the archive lacks fails naming the file and the .nemo."""
    from nemo_kd.models.nemo_artifacts import NemoTokenizerError, extract_nemo_tokenizer, nemo_tokenizer_dir

    monkeypatch.setenv("NEMO_KD_CACHE_DIR", str(tmp_path / "cache"))
    local = nemo_tokenizer_dir(packed["nemo"])
    assert local.startswith(str(tmp_path / "cache"))
    assert {n: _sha256(os.path.join(local, n)) for n in os.listdir(local)} == packed["ref"]["files"]
    assert nemo_tokenizer_dir(packed["nemo"]) == local and len(os.listdir(tmp_path / "cache" / "tokenizers")) == 1

    broken = str(tmp_path / "broken.nemo")
    with tarfile.open(packed["nemo"], "r:*") as src, tarfile.open(broken, "w") as dst:
        for m in src.getmembers():
            if not m.name.endswith("_tokenizer_config.json"):
                dst.addfile(m, src.extractfile(m) if m.isfile() else None)
    assert sorted(extract_nemo_tokenizer(packed["nemo"], str(tmp_path / "ok"))) == sorted(packed["ref"]["files"])
    with pytest.raises(NemoTokenizerError, match=r"broken\.nemo: tokenizer file 'tokenizer_config\.json'"):
        extract_nemo_tokenizer(broken, str(tmp_path / "out"))


def test_nemo_teacher_extracts_with_its_packed_tokenizer(packed, tmp_path):
    """compute_topk_logits with a .nemo teacher and no tokenizer_path, its tokenizer directory gone: the store is
    made with the packed tokenizer (the manifest's tokenizer hash is the original tokenizer's), and a .nemo that
    packs none is refused naming it."""
    out = _run(f"""
        import json
        from omegaconf import OmegaConf
        from nemo_kd.teacher.extract import run_from_config
        from nemo_kd.teacher.store import StoreReader
        run_from_config(OmegaConf.create(dict(data_path={packed['data']!r}, output_path={str(tmp_path / 'store')!r},
                                              top_k=4, max_seq_length={MAX_LEN}, progress=False,
                                              teacher=dict(path={packed['nemo']!r}))))
        m = StoreReader({str(tmp_path / 'store')!r}, verify_checksums=True).manifest
        print(json.dumps(dict(tokenizer_hash=m.tokenizer_hash, num_samples=m.num_samples, k=m.k)))
    """, cache_dir=str(tmp_path / "cache"))
    assert out["tokenizer_hash"] == packed["ref"]["tokenizer_hash"] + ":chat"
    assert (out["num_samples"], out["k"]) == (N, 4)

    from nemo_kd.models.nemo_artifacts import NemoTokenizerError, checkpoint_tokenizer_dir

    bare = str(tmp_path / "bare.nemo")
    with tarfile.open(packed["nemo"], "r:*") as src, tarfile.open(bare, "w") as dst:
        for m in src.getmembers():
            if m.name.endswith("model_config.yaml"):
                import yaml

                cfg = yaml.safe_load(src.extractfile(m).read())
                cfg.pop("tokenizer")
                data = yaml.safe_dump(cfg).encode()
                m.size = len(data)
                dst.addfile(m, io.BytesIO(data))
            else:
                dst.addfile(m, src.extractfile(m) if m.isfile() else None)
    with pytest.raises(NemoTokenizerError, match=r"bare\.nemo: this \.nemo packs no tokenizer"):
        checkpoint_tokenizer_dir(bare)
    assert checkpoint_tokenizer_dir(bare, "/given/tok") == "/given/tok"
    assert checkpoint_tokenizer_dir(str(tmp_path)) == str(tmp_path)  # an HF directory holds its own


def test_checkpoint_tokenizer_dir_of_a_converted_megatron_checkpoint(tmp_path):
    """A converted Megatron checkpoint keeps its tokenizer in ``tokenizer/`` (save_megatron_checkpoint): that
    directory is the one found (it loads as the same tokenizer); one saved without tokenizer files is refused
    by name, not handed to transformers as if it were a tokenizer directory."""
    from transformers import AutoTokenizer

    from nemo_kd.convert.checkpoint_io import MODEL_CONFIG_FILE, TOKENIZER_DIR, copy_tokenizer_files
    from nemo_kd.data.tokenizer_builder import train_byte_level_bpe
    from nemo_kd.models.nemo_artifacts import NemoTokenizerError, checkpoint_tokenizer_dir

    src = str(tmp_path / "src_tok")
    train_byte_level_bpe(TEXTS * 4, vocab_size=300, save_dir=src)
    ckpt = tmp_path / "megatron"
    ckpt.mkdir()
    (ckpt / MODEL_CONFIG_FILE).write_text("{}")
    with pytest.raises(NemoTokenizerError, match=r"megatron: this Megatron checkpoint has no tokenizer/"):
        checkpoint_tokenizer_dir(str(ckpt))
    copy_tokenizer_files(src, str(ckpt / TOKENIZER_DIR))
    found = checkpoint_tokenizer_dir(str(ckpt))
    assert found == str(ckpt / TOKENIZER_DIR)
    text = "hello world, distil me"
    assert AutoTokenizer.from_pretrained(found)(text)["input_ids"] == AutoTokenizer.from_pretrained(src)(text)["input_ids"]


def test_import_nemo_kd_is_light_and_registers_either_order():
    """``import nemo_kd`` imports neither NeMo nor torch; NeMo's allow-list gains ``nemo_kd.`` whether NeMo is
    imported after nemo_kd (the import hook) or before it."""
    env = dict(os.environ, PYTHONPATH=REPO)
    light = subprocess.run([sys.executable, "-c", "import sys, nemo_kd; print(sorted({m.split('.')[0] for m in "
                            "sys.modules} & {'nemo', 'torch', 'megatron', 'transformers'}))"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert light.returncode == 0 and light.stdout.strip() == "[]", light.stdout + light.stderr
    before = subprocess.run([sys.executable, "-c", "from nemo.core.classes import common; import nemo_kd; "
                             "print(common.ALLOWED_TARGET_PREFIXES.count('nemo_kd.'))"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert before.returncode == 0 and before.stdout.strip().splitlines()[-1] == "1", before.stdout + before.stderr
