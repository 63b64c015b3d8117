"""bench-serve-peers' ratios: specd against llama.cpp per concurrency, the best of each side against the other's."""
from bench.serve_peers import ratios


def test_ratios_compare_each_concurrency_on_its_own():
    rows = [{"system": "llama.cpp", "concurrency": 1, "output_tokens_per_s": 30.0},
            {"system": "llama.cpp spec draft-max 3", "concurrency": 1, "output_tokens_per_s": 15.0},
            {"system": "specd K=auto", "concurrency": 1, "output_tokens_per_s": 27.0},
            {"system": "specd K=0", "concurrency": 1, "output_tokens_per_s": 24.0},
            {"system": "llama.cpp", "concurrency": 4, "output_tokens_per_s": 40.0},
            {"system": "llama.cpp spec draft-max 3", "concurrency": 4, "output_tokens_per_s": 44.0},
            {"system": "specd K=auto", "concurrency": 4, "output_tokens_per_s": 33.0},
            {"system": "specd K=0", "concurrency": 4, "output_tokens_per_s": None}]      # a failed cell
    one, four = ratios(rows)
    assert one == {"concurrency": 1, "specd_auto_vs_llama": 0.9, "specd_k0_vs_llama": 0.8,
                   "specd_best_vs_llama_best": 0.9}
    assert four["concurrency"] == 4 and four["specd_k0_vs_llama"] == 0.0
    assert four["specd_best_vs_llama_best"] == 33.0 / 44.0      # llama.cpp's best at c=4 is its speculative one
