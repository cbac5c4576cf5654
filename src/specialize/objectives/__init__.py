"""Training objectives beyond next-token prediction, all run by the one loop (`train.train`).

- `losses`: the preference losses as formulas (DPO sigmoid, IPO, ORPO, KTO), pinned by tests;
- `preference`: the batch source, the loss the loop calls, and the reference model's log-probs;
- `run`: `finetune --objective dpo|orpo|kto`; `grpo`: `finetune --objective grpo` (sampling inside
  the batch source, group-relative advantages);
- `rewards`: what GRPO maximises and `specialize pairs` grades by (metrics, judge, module:function).

The next-token loss itself (SFT, pre-training) is `specialize.loss.token_loss_sum`.
"""
