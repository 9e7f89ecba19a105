#!/bin/bash
#PBS -N stage-run-collect
#PBS -l nodes=4:ppn=2
#PBS -l walltime=00:10:00
#PBS -j oe
#PBS -V
# A Torque job as users write them: stage the input in, run an MPI program on every slot,
# collect the outputs. Runs unchanged under `chiba-admin shell --pbs --nodes ...`.
# MPI_PROGRAM (optional) names an MPICH program; without it each task reports its host.
# On a real cluster the script runs on the first node, not on the home server: serve the
# spool there (`chiba-admin spool serve`) and pass its URL as SPOOL_URL for the stage-in.
set -e
cd "$PBS_O_WORKDIR"
echo "job $PBS_JOBID ($PBS_JOBNAME): $PBS_NUM_NODES nodes x $PBS_NUM_PPN = $PBS_NP slots"
nodes=$(sort -u "$PBS_NODEFILE" | paste -sd, -)
input=${INPUT:-input}
if [ -d "$input" ]; then
    chiba-admin -q stage "$input" --nodes "$nodes" --dest "job-$PBS_JOBID/in" \
        ${SPOOL_URL:+--spool-url "$SPOOL_URL"}
fi
mpiexec -n "$PBS_NP" -l ${MPI_PROGRAM:-sh -c 'echo "$PMI_RANK of $PMI_SIZE on $CHIBA_HOST"'}
pbsdsh -u sh -c 'mkdir -p "$CHIBA_SCRATCH/job-'"$PBS_JOBID"'/out" && hostname > "$CHIBA_SCRATCH/job-'"$PBS_JOBID"'/out/where"'
chiba-admin -q collect "job-$PBS_JOBID/out" --nodes "$nodes" --dest "results-$PBS_JOBID"
echo "outputs in $PBS_O_WORKDIR/results-$PBS_JOBID"
