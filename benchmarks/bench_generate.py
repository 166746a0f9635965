"""Decode speed, time to first token, load time and memory: our engine's weight formats against
Hugging Face transformers, in the same run.

CPU (default): SmolLM2-135M-Instruct from the packaged GGUF (Q4_1), as
- chat / gguf      the file's Q4 weights kept packed and its Q8_0 embedding/LM head kept 8-bit (the default),
                   float32 activations; "torch kernels": the same without our native kernels
                   (CHAT_CORE_NATIVE_KERNELS=0: the Q8_0 table dequantized to float32, as before them)
- chat / int8      a Hugging Face checkpoint of the same weights (written by this script), int8 per channel
                   (the native float32 kernel; "bf16": torch's `_weight_int8pack_mm` in bfloat16)
- chat / int4      the same checkpoint, int4 in groups of 32
- chat / float32, chat / bfloat16   dense weights (the GGUF dequantized at load); bfloat16 on our native kernel
                                    and decoded by the recorded step; "bf16 eager": op by op (`enforce_eager`);
                                    "bf16 torch kernels": oneDNN's product and torch's ops (CHAT_CORE_NATIVE_KERNELS=0)
- chat / ... compiled               the same with the decode step compiled (`compile_decode=True`); its load
                                    time includes the warm-up (compiling, or reading inductor's cache)
- chat / gguf batch-inv.            the default with `batch_invariant=True`
- chat / gguf eager               the default with `enforce_eager=True`: decode steps run op by op in Python
                                   rather than as one recorded native call (worker/native_decode.py)
- transformers / float32, bfloat16  reading the same GGUF
- llama.cpp / Q4_1                 llama.cpp itself on the same file, where the `llama-cpp-cffi` wheel is installed
                                   (`pip install --no-deps llama-cpp-cffi==0.4.20 cffi`: its CPU library, an AVX2
                                   build, called directly; later wheels need a newer libstdc++ than Debian 12's);
                                   greedy argmax over its logits, one sequence per llama.cpp sequence id
`--compare-tree DIR` adds rows for another checkout of this repository (e.g. the previous release,
`git worktree add /tmp/base <commit>`), run from its own sources in the same run.

GPU (`--device cuda --random-weights llama-3.2-1b`): a random-weight checkpoint of Llama-3.2-1B's shape
(made here and cached in a temporary directory: nothing is downloaded), bfloat16, batches 1, 8, 64 and 256,
CUDA graphs and eager, dense and int4, against transformers.

Each configuration runs in its own process (its load time and memory are its own); the whole set runs
`--rounds` times in alternating order and each figure is the median over rounds (this machine is shared and
noisy). Prints a table and writes JSON to benchmarks/results/generate[-cuda].json.

    python benchmarks/bench_generate.py [--rounds 2] [--passes 3] [--new-tokens 128] [--only gguf int8 ...]
    python benchmarks/bench_generate.py --device cuda --random-weights llama-3.2-1b
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from bench_results import results_path, write_results

PROMPT_TOKENS = 32
PROMPT_TEXT = (
    "The history of the printing press begins in the fifteenth century, when movable type changed how "
    "books were made, how ideas travelled across Europe, and how people learned to read and write."
)
LLAMA_32_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=True, head_dim=64,
)  # fmt: skip


@dataclass(frozen=True)
class Config:
    name: str
    impl: str  # "chat", "transformers" or "llama.cpp"
    checkpoint: str  # "gguf" or "hf" (the HF directory this script writes) or "random"
    options: dict = field(default_factory=dict)
    tree: str | None = None  # another checkout's sources (chat only)
    env: dict = field(default_factory=dict)  # environment variables of its process


def cpu_configs(compare_tree: str | None) -> list[Config]:
    configs = [
        Config("chat gguf (default)", "chat", "gguf", {}),
        Config("chat gguf torch kernels", "chat", "gguf", {}, env={"CHAT_CORE_NATIVE_KERNELS": "0"}),
        Config("chat gguf int4 bf16", "chat", "gguf", {"quantization_compute_dtype": "bfloat16"}),
        Config("chat gguf int4 f32", "chat", "gguf", {"quantization_compute_dtype": "float32"}),
        Config("chat gguf eager", "chat", "gguf", {"enforce_eager": True}),
        Config("chat gguf bf16 KV", "chat", "gguf", {"kv_cache_dtype": "bfloat16"}),
        Config("chat gguf compiled", "chat", "gguf", {"compile_decode": True}),
        Config("chat gguf batch-inv.", "chat", "gguf", {"batch_invariant": True}),
        Config("chat int8", "chat", "hf", {"quantization": "int8"}),
        Config("chat int8 bf16", "chat", "hf", {"quantization": "int8", "quantization_compute_dtype": "bfloat16"}),
        Config("chat int8 compiled", "chat", "hf", {"quantization": "int8", "compile_decode": True}),
        Config("chat int4 g32", "chat", "hf", {"quantization": "int4", "quantization_group_size": 32}),
        Config("chat float32", "chat", "gguf", {"quantization": None, "dtype": "float32"}),
        Config("chat bfloat16", "chat", "gguf", {"quantization": None, "dtype": "bfloat16"}),
        Config("chat bf16 eager", "chat", "gguf", {"quantization": None, "dtype": "bfloat16", "enforce_eager": True}),
        Config("chat bf16 torch kernels", "chat", "gguf", {"quantization": None, "dtype": "bfloat16"}, env={"CHAT_CORE_NATIVE_KERNELS": "0"}),
        Config("chat bf16 compiled", "chat", "gguf", {"quantization": None, "dtype": "bfloat16", "compile_decode": True}),
        Config("chat gguf bf16 act.", "chat", "gguf", {"dtype": "bfloat16"}),
        Config("transformers float32", "transformers", "gguf", {"dtype": "float32"}),
        Config("transformers bfloat16", "transformers", "gguf", {"dtype": "bfloat16"}),
    ]
    if llama_cpp_library() is not None:
        configs.append(Config("llama.cpp Q4_1", "llama.cpp", "gguf", {}))
    if compare_tree:
        configs += [
            Config("baseline float32", "chat", "gguf", {"dtype": "float32"}, tree=compare_tree),
            Config("baseline bfloat16", "chat", "gguf", {"dtype": "bfloat16"}, tree=compare_tree),
        ]
    return configs


GPU = {"device": "cuda", "kv_cache_memory_gib": 8.0}  # batch 256 x 160 tokens of a 1B model's cache: 1.3 GiB


def cuda_configs() -> list[Config]:
    return [
        Config("chat bf16 graphs", "chat", "random", {**GPU, "dtype": "bfloat16"}),
        Config("chat bf16 eager", "chat", "random", {**GPU, "dtype": "bfloat16", "enforce_eager": True}),
        Config("chat int4 graphs", "chat", "random", {**GPU, "dtype": "bfloat16", "quantization": "int4", "quantization_group_size": 128}),
        Config("transformers bf16", "transformers", "random", {"device": "cuda", "dtype": "bfloat16"}),
    ]


def smollm2_path() -> str:
    from chat_core.checkpoint.aliases import resolve_alias

    return resolve_alias("smollm2-135m-instruct")


def hf_copy_of_smollm2(directory: str) -> str:
    """SmolLM2's weights as a Hugging Face directory (float32 safetensors, no tokenizer: prompts are token
    ids), written from our own reading of the GGUF: what int8/int4 quantize from."""
    if os.path.exists(os.path.join(directory, "model.safetensors")):
        return directory
    from safetensors.torch import save_file

    from chat_core import open_checkpoint

    checkpoint = open_checkpoint(smollm2_path())
    config = checkpoint.config
    os.makedirs(directory, exist_ok=True)
    save_file({name: tensor.read().float().contiguous() for name, tensor in checkpoint.tensors()}, os.path.join(directory, "model.safetensors"))
    hf_config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "vocab_size": config.vocab_size, "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta, "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": 1, "eos_token_id": list(config.eos_token_ids), "torch_dtype": "float32",
    }  # fmt: skip
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    return directory


def random_llama_1b(directory: str) -> str:
    """A random checkpoint of Llama-3.2-1B's shape (bfloat16 safetensors), made once per temporary directory."""
    if os.path.exists(os.path.join(directory, "model.safetensors")):
        return directory
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA_32_1B, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    return directory


def checkpoint_path(config: Config, work_dir: str) -> str:
    if config.checkpoint == "gguf":
        return smollm2_path()
    if config.checkpoint == "hf":
        return hf_copy_of_smollm2(os.path.join(work_dir, "smollm2-hf"))
    return random_llama_1b(random_checkpoint_dir(work_dir))


def random_checkpoint_dir(work_dir: str) -> str:
    return os.path.join(work_dir, "llama-3.2-1b-random")


def prompt_ids(random_weights: bool) -> list[int]:
    """The prompt every configuration decodes from. Made once, in the parent process, so no measured
    process pays for a tokenizer of its own (opening SmolLM2's and building it holds ~28 MiB)."""
    if random_weights:
        return [(7919 * i) % 120000 + 100 for i in range(PROMPT_TOKENS)]
    from chat_core import open_checkpoint

    ids = open_checkpoint(smollm2_path()).load_tokenizer().encode(PROMPT_TEXT)
    assert len(ids) >= PROMPT_TOKENS, len(ids)
    return ids[:PROMPT_TOKENS]


def rss_mib() -> tuple[float, float]:
    """(peak, current) resident memory of this process."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return peak, current


class OurEngine:
    def __init__(self, path: str, options: dict) -> None:
        from chat_core import Engine

        self.engine = Engine.from_pretrained(path, max_num_seqs=256, **options)
        self.vocab_size = self.engine.model_config.vocab_size

    def run(self, ids: list[int], batch: int, new_tokens: int) -> None:
        from chat_core import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        outputs = self.engine.generate([{"prompt_token_ids": ids}] * batch, params)
        assert all(len(o.token_ids) == new_tokens for o in outputs)


class Transformers:
    def __init__(self, path: str, options: dict) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.device = options.get("device", "cpu")
        dtype = getattr(torch, options.get("dtype", "float32"))
        # `dtype=` from transformers 4.56 (older releases ignore it and load float32); `torch_dtype=` before
        dtype_option = {"dtype" if _version(transformers.__version__) >= (4, 56) else "torch_dtype": dtype}
        if path.endswith(".gguf"):
            directory, name = os.path.split(path)
            model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, **dtype_option)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **dtype_option)
        if next(model.parameters()).dtype != dtype:
            raise RuntimeError(f"transformers loaded {next(model.parameters()).dtype}, not the {dtype} asked for")
        self.model = model.to(self.device).eval()
        self.vocab_size = model.config.vocab_size

    def run(self, ids: list[int], batch: int, new_tokens: int) -> None:
        input_ids = self.torch.tensor([ids] * batch, device=self.device)
        with self.torch.no_grad():
            out = self.model.generate(
                input_ids,
                attention_mask=self.torch.ones_like(input_ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        assert out.shape[1] == len(ids) + new_tokens


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


def llama_cpp_library() -> str | None:
    """The CPU library of the installed `llama-cpp-cffi` wheel (found without importing its package, whose
    __init__ wants more dependencies), or None."""
    import glob
    import importlib.util

    spec = importlib.util.find_spec("llama")
    for location in (spec.submodule_search_locations or []) if spec else []:
        found = glob.glob(os.path.join(location, "_llama_cpp_cpu*.so"))
        if found:
            return found[0]
    return None


class LlamaCpp:
    """llama.cpp's C API through the cffi module of `llama-cpp-cffi`: batch sequences decoded side by side."""

    def __init__(self, path: str, options: dict) -> None:
        import importlib.util

        spec = importlib.util.spec_from_file_location("_llama_cpp_cpu", llama_cpp_library())
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.lib, self.ffi = module.lib, module.ffi
        self.lib.llama_backend_init()
        self.model = self.lib.llama_model_load_from_file(path.encode(), self.lib.llama_model_default_params())
        self.vocab_size = self.lib.llama_vocab_n_tokens(self.lib.llama_model_get_vocab(self.model))
        self.contexts: dict[int, tuple] = {}  # batch size -> (context, llama_batch)

    def context(self, batch: int) -> tuple:
        if batch not in self.contexts:
            params = self.lib.llama_context_default_params()
            params.n_ctx, params.n_batch, params.n_ubatch = batch * 256, batch * PROMPT_TOKENS, batch * PROMPT_TOKENS
            params.n_seq_max, params.n_threads, params.n_threads_batch = batch, os.cpu_count(), os.cpu_count()
            context = self.lib.llama_init_from_model(self.model, params)
            self.contexts[batch] = (context, self.lib.llama_batch_init(batch * PROMPT_TOKENS, 0, batch))
        return self.contexts[batch]

    def run(self, ids: list[int], batch: int, new_tokens: int) -> None:
        import numpy as np

        context, tokens = self.context(batch)  # tokens: the llama_batch fed to each decode
        self.lib.llama_kv_cache_clear(context)
        count = 0
        for seq in range(batch):  # the prompts, logits only for each one's last token
            for position, token in enumerate(ids):
                tokens.token[count], tokens.pos[count], tokens.n_seq_id[count] = token, position, 1
                tokens.seq_id[count][0], tokens.logits[count] = seq, position == len(ids) - 1
                count += 1
        tokens.n_tokens = count
        rows = [(seq + 1) * len(ids) - 1 for seq in range(batch)]
        for step in range(new_tokens):
            assert self.lib.llama_decode(context, tokens) == 0
            for seq, row in enumerate(rows):
                logits = self.ffi.buffer(self.lib.llama_get_logits_ith(context, row), self.vocab_size * 4)
                tokens.token[seq] = int(np.frombuffer(logits, dtype=np.float32).argmax())
                tokens.pos[seq], tokens.n_seq_id[seq], tokens.seq_id[seq][0], tokens.logits[seq] = len(ids) + step, 1, seq, 1
            tokens.n_tokens = batch
            rows = list(range(batch))


# Each implementation's modules: imported before its load is timed. (The GGUF configurations imported
# chat_core already to find the file, the Hugging Face ones did not: their load times held torch's import.)
IMPORTED_BEFORE_LOADING = {"chat": ["chat_core"], "transformers": ["torch", "transformers"], "llama.cpp": []}


def measure(config: Config, work_dir: str, ids: list[int], passes: int, new_tokens: int, batches: list[int]) -> dict[str, float]:
    path = checkpoint_path(config, work_dir)
    cuda = config.options.get("device", "cpu").startswith("cuda")
    if cuda:
        import torch

        sync = torch.cuda.synchronize
    else:

        def sync() -> None:
            pass

    for module in IMPORTED_BEFORE_LOADING[config.impl]:  # load_s is the load alone, whatever was imported so far
        importlib.import_module(module)
    start = time.perf_counter()
    runner = {"chat": OurEngine, "transformers": Transformers, "llama.cpp": LlamaCpp}[config.impl](path, config.options)
    sync()
    load_s = time.perf_counter() - start
    _, load_rss = rss_mib()
    runner.run(ids, 1, 4)  # warm-up

    def timed(batch: int, tokens: int) -> float:
        sync()
        t = time.perf_counter()
        runner.run(ids, batch, tokens)
        sync()
        return time.perf_counter() - t

    result: dict[str, float] = {"load_s": load_s, "load_rss_mib": load_rss}
    result["ttft_ms"] = statistics.median(timed(1, 1) for _ in range(passes)) * 1000
    for batch in batches:
        first = statistics.median(timed(batch, 1) for _ in range(passes))
        total = statistics.median(timed(batch, new_tokens) for _ in range(passes))
        step = (total - first) / (new_tokens - 1)
        result[f"tok_s_b{batch}"] = batch / step
        result[f"ms_step_b{batch}"] = step * 1000
    result["peak_rss_mib"], result["steady_rss_mib"] = rss_mib()
    if cuda:  # the GPU's own: weights, KV cache, activations, graphs (torch's allocator)
        result["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def run_config(config: Config, args: argparse.Namespace) -> dict[str, float] | None:
    cmd = [sys.executable, __file__, "--worker", json.dumps(config.__dict__), "--work-dir", args.work_dir]
    cmd += ["--prompt-ids", ",".join(map(str, args.prompt_ids))]
    cmd += ["--passes", str(args.passes), "--new-tokens", str(args.new_tokens), "--batches", *map(str, args.batches)]
    env = dict(os.environ) | config.env
    if config.tree:  # another checkout: its own sources first on the path
        sources = [os.path.join(config.tree, "packages", p, "src") for p in ("chat_core", "chat_distributed", "chat_cli")]
        env["PYTHONPATH"] = os.pathsep.join([*sources, env.get("PYTHONPATH", "")])
    print(f"running {config.name} ...", file=sys.stderr, flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        print(f"  {config.name} failed:\n{result.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--random-weights", choices=["llama-3.2-1b"], help="benchmark a random checkpoint of this shape")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--only", nargs="+", help="configurations whose name contains one of these")
    parser.add_argument("--compare-tree", help="another checkout of this repository to run as 'baseline'")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "chat-bench"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpu = args.device == "cuda"
    args.batches = args.batches or ([1, 8, 64, 256] if gpu else [1, 8])
    args.new_tokens = args.new_tokens or 128
    os.makedirs(args.work_dir, exist_ok=True)
    if args.worker:
        config = Config(**json.loads(args.worker))
        ids = [int(i) for i in args.prompt_ids.split(",")]
        print(json.dumps(measure(config, args.work_dir, ids, args.passes, args.new_tokens, args.batches)))
        return
    if gpu and args.random_weights != "llama-3.2-1b":
        parser.error("--device cuda benchmarks the --random-weights llama-3.2-1b checkpoint")

    configs = cuda_configs() if gpu else cpu_configs(args.compare_tree)
    if gpu:  # made in a process of its own: not in the first measured one's memory figures
        make = "import sys; sys.path.insert(0, sys.argv[1]); import bench_generate as b; b.random_llama_1b(sys.argv[2])"
        subprocess.run([sys.executable, "-c", make, os.path.dirname(os.path.abspath(__file__)), random_checkpoint_dir(args.work_dir)], check=True)
    args.prompt_ids = prompt_ids(random_weights=gpu)
    if args.only:
        configs = [c for c in configs if any(word in c.name for word in args.only)]
    per_round: dict[str, list[dict[str, float]]] = {c.name: [] for c in configs}
    failed: set[str] = set()
    for round_index in range(args.rounds):
        for config in configs if round_index % 2 == 0 else reversed(configs):
            result = run_config(config, args)
            if result is None:
                failed.add(config.name)
            else:
                per_round[config.name].append(result)

    rows = []
    for config in configs:
        results = per_round[config.name]
        if results:
            rows.append({"name": config.name, **{key: statistics.median(r[key] for r in results) for key in results[0]}})
    columns = ["load_s", "ttft_ms", *[f"tok_s_b{b}" for b in args.batches], *[f"ms_step_b{b}" for b in args.batches], "load_rss_mib", "peak_rss_mib", "steady_rss_mib"]
    columns += ["gpu_peak_mib"] if gpu else []
    print(f"{'configuration':<24}" + "".join(f"{c:>15}" for c in columns))
    for row in rows:
        print(f"{row['name']:<24}" + "".join(f"{row.get(c, float('nan')):>15.2f}" for c in columns))
    reference = next((r for r in rows if r["name"].startswith("transformers")), None)
    ratios = {}
    if reference:
        for row in rows:
            ratios[row["name"]] = {f"tok_s_b{b}": row[f"tok_s_b{b}"] / reference[f"tok_s_b{b}"] for b in args.batches}
        print(f"\ndecode speed relative to {reference['name']}:")
        for name, ratio in ratios.items():
            print(f"  {name:<24}" + "  ".join(f"b{k[7:]} x{v:.2f}" for k, v in ratio.items()))
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "prompt_ids")}
    report = {"settings": settings | {"prompt_tokens": PROMPT_TOKENS}, "rows": rows, "ratios": ratios}
    write_results(results_path("generate-cuda.json" if gpu else "generate.json"), report | {"failed": sorted(failed)})
    if failed:  # a configuration that crashed is a failed benchmark (gpu_check.sh reports it), not a missing row
        sys.exit(f"failed: {', '.join(sorted(failed))}")


if __name__ == "__main__":
    main()
