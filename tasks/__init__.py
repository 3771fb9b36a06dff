"""Fine-tuning tasks that judge a pretrained BERT checkpoint, as Megatron-LM's `tasks/` does.

    python tasks/finetune_pair.py --task MNLI --pretrained-checkpoint runs/bert/checkpoints \
        --train-data glue/MNLI/train.tsv --valid-data glue/MNLI/dev_matched.tsv glue/MNLI/dev_mismatched.tsv

- glue.py           GLUE TSV readers (MNLI, QQP layouts) and the sentence-pair dataset
- checkpoint.py     a pretrained BERT from its checkpoint, in any tensor/pipeline-parallel layout
- finetune_pair.py  classifier on the pooled [CLS], the training loop, accuracy on each validation file
"""
