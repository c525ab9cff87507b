"""losslab.pipelines."""
