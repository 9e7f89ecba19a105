#!/bin/bash
#SBATCH -J stage-run-collect
#SBATCH -N 4
#SBATCH --ntasks-per-node=2
#SBATCH -t 10:00
# A Slurm batch script: stage in, run, collect. Runs unchanged under
# `chiba-admin shell --slurm --nodes ...` (or inside a real allocation without --nodes).
# On a real cluster the script runs on the first node, not on the home server: serve the
# spool there (`chiba-admin spool serve`) and pass its URL as SPOOL_URL for the stage-in.
set -e
echo "job $SLURM_JOB_ID on $SLURM_JOB_NODELIST: $SLURM_NTASKS tasks"
input=${INPUT:-input}
if [ -d "$input" ]; then
    chiba-admin -q stage "$input" --nodes "$SLURM_JOB_NODELIST" --dest "job-$SLURM_JOB_ID/in" \
        ${SPOOL_URL:+--spool-url "$SPOOL_URL"}
fi
srun -l ${MPI_PROGRAM:-sh -c 'echo "task $SLURM_PROCID (local $SLURM_LOCALID) on $CHIBA_HOST"'}
srun -N "$SLURM_NNODES" -n "$SLURM_NNODES" sh -c 'mkdir -p "$CHIBA_SCRATCH/job-'"$SLURM_JOB_ID"'/out" && hostname > "$CHIBA_SCRATCH/job-'"$SLURM_JOB_ID"'/out/where"'
chiba-admin -q collect "job-$SLURM_JOB_ID/out" --nodes "$SLURM_JOB_NODELIST" --dest "results-$SLURM_JOB_ID"
echo "outputs in $SLURM_SUBMIT_DIR/results-$SLURM_JOB_ID"
