"""The flagship search: DualGAN on facades over Batch Renorm clipping, reconstruction weights, norm
kind and learning rate, judged in eval (inference) mode on the validation split.

    python jobs/tune_dualgan.py --num-samples 8 --scheduler asha
    python jobs/tune_dualgan.py --recipe dualgan_facades-quick --num-samples 4 --max-steps 120
    ray start --head  # then, from the repo:
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/tune_dualgan.py --recipe dualgan_facades-quick --num-samples 4

Objective: facades photo→label per-pixel accuracy (`eval/pixel_acc_ab`, the CycleGAN paper's
photo→labels score) of the eval-mode translation; PSNR of label→photo rewards blur, so it is
reported but not optimised (pick another with --metric). Every flag of jobs/tune.py applies;
`--space` replaces the default space below.
"""

import sys

from jobs import tune

DEFAULT_SPACE = [
    "renorm.rmax=uniform:1.5:5",
    "renorm.dmax=uniform:0.5:5",
    # 0: the paper's warm-up shape over the run's length; 10: almost none; 200: rmax fully open at
    # step 200 (beyond a quick recipe's 120 steps), batch norm until 25 and dmax open at 125.
    "renorm.warmup_steps=choice:0,10,200",
    "model.lambda_a=loguniform:100:1000",
    "model.lambda_b=loguniform:100:1000",
    "model.norm=choice:batch,batch_renorm,instance",
    "optim.lr=loguniform:1e-5:3e-4",
]
DEFAULTS = {"recipe": "dualgan_facades", "metric": "eval/pixel_acc_ab", "space": DEFAULT_SPACE}

if __name__ == "__main__":
    sys.exit(tune.main(defaults=DEFAULTS))
