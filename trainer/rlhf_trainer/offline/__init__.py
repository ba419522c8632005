"""The offline stages (sft, reward, dpo, rrhf) and the training loop they share."""
