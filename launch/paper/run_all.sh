#!/usr/bin/env bash
# The paper's experiments (§4, App. H) end to end on a GPU machine with internet (hub datasets and reward models).
# Every stage is `python -m mixdpo_ds.apps.paper <stage>` or `mixdpo train`; see README.md for what each does.
# Usage: bash launch/paper/run_all.sh            (env: N_TRAIN, N_TEST, SFT_STEPS, NGPU)
set -euo pipefail
N_TRAIN=${N_TRAIN:-25000}; N_TEST=${N_TEST:-10000}; SFT_STEPS=${SFT_STEPS:-4000}; NGPU=${NGPU:-1}
D=data/paper; R=runs/paper; P="python -m mixdpo_ds.apps.paper"
mkdir -p $D $R
SENT=${SENT:-hf:text-classification:lvwerra/distilbert-imdb:POSITIVE}
INFO=${INFO:-local:informativeness}   # swap in a hub informativeness reward model: hf:TASK:MODEL:LABEL
GRAM=${GRAM:-hf:text-classification:textattack/roberta-base-CoLA:LABEL_1}
BOOK=${BOOK:-hf:text-classification:nlptown/bert-base-multilingual-uncased-sentiment:5 stars}

# 1. prompts and SFT texts
$P prepare --source imdb --split train --max-rows $N_TRAIN --out $D/imdb_train.jsonl
$P prepare --source imdb --split test --max-rows $N_TEST --out $D/imdb_test.jsonl
$P prepare --source amazon_books --max-rows $((N_TRAIN + N_TEST)) --out $D/books_all.jsonl
head -n $N_TRAIN $D/books_all.jsonl > $D/books_train.jsonl; tail -n $N_TEST $D/books_all.jsonl > $D/books_test.jsonl
cat $D/imdb_train.jsonl $D/books_train.jsonl > $D/sft_train.jsonl
# 2. SFT GPT-2 on the review texts (the base and reference policy)
$P sft --model gpt2 --data $D/sft_train.jsonl --out $R/sft_gpt2 --steps $SFT_STEPS --batch-size 32 --lr 5e-5
# 3. two completions per prompt, 4. annotate, 5. pairs
for split in train test; do
  $P sample --model $R/sft_gpt2 --data $D/imdb_$split.jsonl --out $D/imdb_${split}_compl.jsonl --n 2
  $P annotate --data $D/imdb_${split}_compl.jsonl --out $D/imdb_${split}_scored.jsonl \
     --reward "sentiment=$SENT" --reward "informativeness=$INFO" --reward "grammar=$GRAM"
  $P pairs --data $D/imdb_${split}_scored.jsonl --out $D/pairs_multi_$split.jsonl \
     --groups sentiment,informativeness,grammar
  $P sample --model $R/sft_gpt2 --data $D/books_$split.jsonl --out $D/books_${split}_compl.jsonl --n 2
  cat $D/imdb_${split}_compl.jsonl $D/books_${split}_compl.jsonl > $D/context_${split}_compl.jsonl
  $P annotate --data $D/context_${split}_compl.jsonl --out $D/context_${split}_scored.jsonl \
     --reward "movie_sentiment=$SENT" --reward "book_sentiment=$BOOK"
  $P pairs --data $D/context_${split}_scored.jsonl --out $D/pairs_context_$split.jsonl \
     --by-domain movie=movie_sentiment,book=book_sentiment
done
# 6. train: DPO baseline, Mix-DPO Case 1 / Case 2, MoE-DPO frozen / learnable gate
L="deepspeed --num_gpus $NGPU $(which mixdpo)"
$L train --config launch/paper/mixdpo_case1.yaml experts.num_experts=1 train.output_dir=$R/dpo_multi
$L train --config launch/paper/mixdpo_case1.yaml
$L train --config launch/paper/mixdpo_case1.yaml em.gate_update=frozen train.output_dir=$R/mixdpo_case1_fixed_w
$L train --config launch/paper/mixdpo_case2.yaml
$L train --config launch/paper/moedpo_case1.yaml experts.num_experts=1 gate.kind=mix gate.pretrain_steps=0 \
   train.output_dir=$R/dpo_context
$L train --config launch/paper/moedpo_case1.yaml
$L train --config launch/paper/moedpo_case1.yaml em.gate_update=alternate train.output_dir=$R/moedpo_case1_learnable
# 7. evaluate: held-out pairs (responsibilities, recovery) and reward tables on 10,000 test prompts
for run in dpo_multi mixdpo_case1 mixdpo_case1_fixed_w mixdpo_case2; do
  mixdpo evaluate --run $R/$run --data $D/pairs_multi_test.jsonl --out $R/$run/eval_pairs.jsonl
  $P evaluate --run $R/$run --data $D/imdb_test.jsonl --out $R/$run/table1.json \
     --reward "sentiment=$SENT" --reward "informativeness=$INFO" --reward "grammar=$GRAM"
done
cat $D/imdb_test.jsonl $D/books_test.jsonl > $D/context_test.jsonl
for run in dpo_context moedpo_case1_frozen moedpo_case1_learnable; do
  mixdpo evaluate --run $R/$run --data $D/pairs_context_test.jsonl --out $R/$run/eval_pairs.jsonl
  $P evaluate --run $R/$run --data $D/context_test.jsonl --out $R/$run/table2.json \
     --reward "movie_sentiment=$SENT" --reward "book_sentiment=$BOOK" --by-domain movie=movie_sentiment,book=book_sentiment
done
echo "tables: $R/*/table1.json, $R/*/table2.json"
