"""Engine: the offline API, the model runner, requests, sampling and the tokenizer."""
