"""The R/S/E rubric (Risk appraisal, Safety of consequences, Effectiveness): prompts and strict parsing."""
