"""The model at run time: image preprocessing, vision (torch), prompt, LLM (llama.cpp), pipeline."""
