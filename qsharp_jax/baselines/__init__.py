"""Policy-training baselines on the same harness as Q♯: REINFORCE, DPO, RPO (CD is Q♯'s driver with
``guidance="cd"``)."""
